"""What every loader backend shares: the sample table, the per-epoch plan, labels and resume state.

All backends consume the same *plan*: for (seed, epoch) a permutation of the global sample indices
(train) or dataset order (eval). Train: cut into global batches of ``batch_size * world_size``,
each split into one slice per rank, so every step sees the samples one rank with the global
batch would see. Eval: cut into one equal share per rank and then into batches. So for
the same arguments DALI, torch and torch-gpu read exactly the same samples in the same batches;
only the pixel arithmetic differs. Reading a sample by global index needs random access, which
the DALI index files (``X.tar.idx``, member offsets) give for shards on a (shared) file system.

Equal batch counts: ``drop_last=True`` (train) trims every share to ``N // world_size`` samples
and drops the incomplete last batch; ``drop_last=False`` (eval) pads every share to
``ceil(N / world_size)`` by repeating the share's last sample (at most one repeat per rank), so
an evaluator that gathers ``Batch.index`` from all ranks drops duplicates by index.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data_shards import format as fmt
from data_shards import shard_index as sidx
from data_shards.images import DEFAULT_MAX_PIXELS, open_image

_log = logging.getLogger(__name__)


class Batch(NamedTuple):
    """One batch: images (B,3,H,W) on the loader's device/dtype; labels int8 (B,C); index int64 (B,)."""

    images: torch.Tensor
    partial: torch.Tensor
    full: torch.Tensor
    index: torch.Tensor


class SkippedSample(Exception):
    """A sample whose image cannot be decoded; loaders skip and count it."""


# ----------------------------------------------------------------------------------------------
# the per-epoch plan
# ----------------------------------------------------------------------------------------------
def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Global sample indices of one epoch, in reading order (a (seed, epoch) permutation if shuffled)."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples).astype(np.int64)


def rank_batches(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 epoch: int, shuffle: bool, drop_last: bool) -> list[np.ndarray]:
    """The batches (arrays of global indices) that ``rank`` reads in ``epoch``; same count on all ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = epoch_order(num_samples, seed, epoch, shuffle)
    if drop_last:
        per = num_samples // world_size
        count = per // batch_size
        if count == 0:
            raise ValueError(
                f"{num_samples} samples over {world_size} ranks give {per} per rank: not one full batch "
                f"of {batch_size} (drop_last=True)"
            )
        # global step k reads order[k*G:(k+1)*G] (G = batch_size * world_size), rank r its r-th
        # slice: the same samples per step as one rank with batch G (world-size invariance)
        steps = order[: count * batch_size * world_size].reshape(count, world_size, batch_size)
        return list(steps[:, rank])
    lo, hi = (num_samples * rank) // world_size, (num_samples * (rank + 1)) // world_size
    longest = math.ceil(num_samples / world_size)
    share = order[lo:hi]
    if share.size == 0:
        raise ValueError(f"rank {rank} of {world_size} gets no sample of {num_samples}")
    share = np.concatenate([share, np.full(longest - share.size, share[-1], dtype=np.int64)])
    return [share[i: i + batch_size] for i in range(0, longest, batch_size)]


# ----------------------------------------------------------------------------------------------
# the sample table: global index -> (shard, member offsets), from the DALI index files
# ----------------------------------------------------------------------------------------------
@dataclass
class SampleTable:
    """Where every sample's members lie: arrays indexed by global sample index."""

    shard_paths: list[Path]
    shard: np.ndarray     # (N,) shard number
    keys: list[str]       # (N,) member key
    offsets: np.ndarray   # (N, 3) byte offsets of .jpg, .lbl, .idx data
    sizes: np.ndarray     # (N, 3)

    def check_headers(self) -> None:
        """Every entry against the tar header before it (for readers that do not check per read)."""
        for k, path in enumerate(self.shard_paths):
            rows = np.flatnonzero(self.shard == k)
            samples = [(int(i), {e: sidx.Member(int(self.offsets[i, j]), int(self.sizes[i, j]))
                                 for j, e in enumerate(sidx.EXTS)}) for i in rows]
            sidx.check_all_headers(path, samples)


_EXTS = sidx.EXTS


def build_sample_table(shard_dir: str | Path, info: dict) -> SampleTable:
    """Every shard's validated DALI index (or its tar scanned): bounds, order, names (see shard_index)."""
    n = int(info["num_samples"])
    c = len(info["classes"])
    shard = np.empty(n, dtype=np.int64)
    offsets = np.zeros((n, 3), dtype=np.int64)
    sizes = np.zeros((n, 3), dtype=np.int64)
    paths = [Path(shard_dir) / s["name"] for s in info["shards"]]
    first = 0
    for k, path in enumerate(paths):
        count = info["shards"][k]["samples"]
        idx_path = fmt.dali_index_path(path)
        if idx_path.exists():
            want = info["shards"][k].get("index_sha256")
            if want is not None and hashlib.sha256(idx_path.read_bytes()).hexdigest() != want:
                raise ValueError(f"{idx_path}: sha256 differs from _info.json (damaged or replaced index)")
            samples = sidx.parse_index(idx_path, path, first, count, c)
        else:
            samples = sidx.parse_tar(path, first, count, c)
        for i, members in samples:
            offsets[i] = [members[e].offset for e in _EXTS]
            sizes[i] = [members[e].size for e in _EXTS]
        shard[first: first + count] = k
        first += count
    keys = [fmt.sample_key(i) for i in range(n)]
    return SampleTable(paths, shard, keys, offsets, sizes)


class SampleReader:
    """Random access to a sample's bytes; checks its .idx and .lbl against the label matrix.

    File handles are per process (opened lazily, reopened after a fork in a worker).
    """

    def __init__(self, table: SampleTable, full: np.ndarray):
        self.table, self.full = table, full
        self._files: dict[int, object] = {}
        self._pid = -1
        self._lock = threading.Lock()

    def _read(self, shard: int, offset: int, size: int, name: str, where: str) -> bytes:
        """The member's data, read together with its tar header, which must name it (one read)."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.table.shard_paths[shard], "rb")  # noqa: SIM115
        with self._lock:
            f.seek(offset - sidx.BLOCK)
            raw = f.read(size + sidx.BLOCK)
        sidx.check_header(raw[: sidx.BLOCK], name, size, where)
        if len(raw) != size + sidx.BLOCK:
            raise ValueError(f"{where}: {name} is cut short (the shard changed after it was opened)")
        return raw[sidx.BLOCK:]

    def where(self, index: int) -> str:
        return f"shard {self.table.shard_paths[self.table.shard[index]].name}, key {self.table.keys[index]}"

    def read(self, index: int) -> bytes:
        """JPEG bytes of sample ``index`` after checking its index and label members."""
        t = self.table
        s, (jo, lo, io_), (js, ls, is_) = int(t.shard[index]), t.offsets[index], t.sizes[index]
        where = self.where(index)
        key = t.keys[index]
        got = fmt.decode_index(self._read(s, io_, is_, f"{key}.{fmt.INDEX_EXT}", where), where)
        if got != index:
            raise ValueError(f"{where}: .idx member says {got}, expected {index}")
        check_label(self._read(s, lo, ls, f"{key}.{fmt.LABEL_EXT}", where), self.full, index, where)
        return self._read(s, jo, js, f"{key}.{fmt.IMAGE_EXT}", where)


def check_label(raw: bytes, full: np.ndarray, index: int, where: str) -> None:
    """The per-sample .lbl must equal row ``index`` of the label matrix."""
    lbl = fmt.decode_labels(raw, full.shape[1], where)
    if not np.array_equal(lbl, full[index]):
        raise ValueError(f"{where}: .lbl differs from row {index} of the label matrix")


# ----------------------------------------------------------------------------------------------
# bad JPEGs
# ----------------------------------------------------------------------------------------------
def jpeg_markers_ok(data: bytes) -> bool:
    """Start/end markers present: catches truncation for the cost of two slices."""
    return len(data) >= 4 and data[:3] == b"\xff\xd8\xff" and b"\xff\xd9" in data[-64:]


def jpeg_is_valid(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Check run before decoding by the backends whose decoder cannot skip a bad image (DALI).

    Start/end markers catch truncation; a 1/8-scale DCT decode with PIL catches most corrupt
    streams for a fraction of a full decode; the header's size must be within ``max_pixels``
    (:mod:`data_shards.images`' limit), so no decoder allocates for a bomb. DALI raises inside
    the pipeline on a bad image, so it must never see one. The PIL backends decode fully anyway:
    they check the markers and catch the decoder's own error instead, which skips the same
    samples without decoding twice.
    """
    if not jpeg_markers_ok(data):
        return False
    try:
        im = open_image(data, max_pixels=max_pixels)
        if im.format != "JPEG":
            return False
        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# dataset description shared by the backends
# ----------------------------------------------------------------------------------------------
@dataclass
class ShardSet:
    """One split: its info, full and partial label matrices, and (for local shards) the sample table."""

    shard_dir: Path
    split: str
    info: dict
    full: np.ndarray
    partial: np.ndarray
    table: SampleTable | None

    @property
    def num_samples(self) -> int:
        return int(self.info["num_samples"])

    @property
    def num_classes(self) -> int:
        return len(self.info["classes"])

    def shard_ranges(self) -> np.ndarray:
        """(S+1,) cumulative sample counts: shard k holds global indices [r[k], r[k+1])."""
        return np.concatenate([[0], np.cumsum([s["samples"] for s in self.info["shards"]])]).astype(np.int64)


def open_shard_set(shard_dir: str | Path, split: str, proportion: float, seed: int,
                   num_classes: int | None, with_table: bool = True) -> ShardSet:
    """Read ``_info.json`` and the label matrix; derive the partial labels once (DESIGN §4)."""
    from data_shards.partial import partial_labels  # lazy: the converters' module

    info = fmt.read_info(shard_dir, split, num_classes)
    full = fmt.load_label_matrix(shard_dir, info)
    partial = partial_labels(full, proportion, seed)
    table = build_sample_table(shard_dir, info) if with_table else None
    return ShardSet(Path(shard_dir), split, info, full, partial, table)


# ----------------------------------------------------------------------------------------------
# the loader protocol shared by the backends
# ----------------------------------------------------------------------------------------------
class BaseLoader:
    """Epoch/position bookkeeping and label attachment; a backend implements :meth:`_produce`.

    ``_produce(batches, start)`` yields, for batches ``start, start+1, ...`` of the plan, a tuple
    (images on ``self.device`` normalized in float, kept global indices (np.int64), skipped indices).
    A skipped sample shrinks its batch; the number of batches never changes.
    """

    backend = "base"

    def __init__(self, shards: ShardSet, *, train: bool, batch_size: int, image_size: int, seed: int,
                 rank: int, world_size: int, num_workers: int, device: str | torch.device,
                 dtype: torch.dtype, drop_last: bool):
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.shards, self.train, self.batch_size = shards, train, batch_size
        self.image_size, self.seed, self.rank, self.world_size = image_size, seed, rank, world_size
        self.num_workers, self.device, self.dtype = num_workers, torch.device(device), dtype
        self.drop_last = drop_last
        self.epoch, self._position = 0, 0
        self.skipped = 0  # undecodable images of the current epoch so far (see _reset_skipped)
        self.skipped_where: list[str] = []
        self._len = len(self.plan(0))  # also validates rank/batch_size against N

    def plan(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of global indices for ``epoch`` (default: the current one)."""
        return rank_batches(self.shards.num_samples, self.batch_size, self.rank, self.world_size, self.seed,
                            self.epoch if epoch is None else epoch, self.train, self.drop_last)

    def __len__(self) -> int:
        return self._len

    @property
    def position(self) -> int:
        """Batches of the current epoch already yielded (where a resumed epoch continues)."""
        return self._position

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; a new epoch starts at its first batch (and skip count)."""
        if epoch != self.epoch:
            self.epoch, self._position = int(epoch), 0
            self._reset_skipped()

    def _reset_skipped(self) -> None:
        """``skipped``/``skipped_where`` count the current epoch only (the trainer logs them per epoch)."""
        self.skipped = 0
        self.skipped_where = []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self._position, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "num_samples": self.shards.num_samples, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration yields the remaining batches of ``state['epoch']``."""
        for key in ("seed", "batch_size", "world_size", "num_samples"):
            mine = getattr(self, key, None) if key != "num_samples" else self.shards.num_samples
            if state.get(key, mine) != mine:
                raise ValueError(f"loader state has {key}={state[key]} but this loader has {key}={mine}: "
                                 "resuming would not reproduce the data stream")
        if not 0 <= int(state["batch"]) <= self._len:
            raise ValueError(f"loader state batch={state['batch']} outside [0, {self._len}]")
        self.epoch, self._position = int(state["epoch"]), int(state["batch"])
        self.skipped = int(state.get("skipped", 0))

    def _note_skipped(self, indices) -> None:
        for i in indices:
            self.skipped += 1
            t = self.shards.table
            where = f"index {i}" if t is None else f"shard {t.shard_paths[t.shard[i]].name}, key {t.keys[i]}"
            self.skipped_where.append(where)
            _log.warning("skipped undecodable JPEG (%s); %d skipped so far", where, self.skipped)

    def __iter__(self):
        if self._position >= self._len:  # iterating a finished epoch again replays it
            self._position = 0
        if self._position == 0:
            self._reset_skipped()
        batches = self.plan()
        for images, kept, skipped in self._produce(batches, self._position):
            self._note_skipped(skipped)
            kept = np.asarray(kept, dtype=np.int64)
            self._position += 1
            yield Batch(
                images.to(self.device, self.dtype, non_blocking=True),
                torch.from_numpy(self.shards.partial[kept]).to(self.device),
                torch.from_numpy(self.shards.full[kept]).to(self.device),
                torch.from_numpy(kept).to(self.device),
            )

    def _produce(self, batches: list[np.ndarray], start: int):
        raise NotImplementedError
