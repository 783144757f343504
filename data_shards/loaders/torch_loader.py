"""torch backend: PIL decode + bicubic transforms in DataLoader worker processes.

Each worker builds whole batches of the shared plan (batch ``start + w + k * num_workers`` in
worker ``w``); the DataLoader takes batches from its workers in turn, so the output order is
exactly the plan's, with any number of workers, and resume is a batch offset.

Reading: local shards by random access through the DALI index (seek + read of one sample).
Shards given as URLs (``shard_url``: http, ``pipe:`` commands, any path webdataset opens) stream
through ``wds.WebDataset`` with explicit shard lists: a worker streams the shards that hold its
samples and keeps only those, holding its share of the epoch in memory until its batches are
built (the price of a global per-epoch permutation over non-seekable streams).
"""

from __future__ import annotations

import shlex
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_shards import format as fmt
from data_shards.loaders import augment as aug
from data_shards.loaders.common import BaseLoader, SampleReader, ShardSet, check_label, jpeg_markers_ok


def decode_batch(datas: list[bytes], index: np.ndarray, cfg: aug.AugConfig, train: bool, seed: int,
                 epoch: int) -> tuple[torch.Tensor, np.ndarray, list[int]]:
    """Augmented uint8 (B',3,H,W) of the decodable samples, their indices, and the skipped ones."""
    params = aug.train_params(cfg, seed, epoch, index) if train else None
    arrays, kept, skipped = [], [], []
    for j, (data, i) in enumerate(zip(datas, index.tolist())):
        try:
            if not jpeg_markers_ok(data):
                raise ValueError("JPEG start/end marker missing")
            im = aug.pil_decode(data, where=f"sample {i}")
        except ValueError:  # undecodable or over the pixel limit (open_rgb's errors)
            skipped.append(i)
            continue
        if train:
            p = params
            arr = aug.pil_train(im, cfg, int(p.side[j]), int(p.x[j]), int(p.y[j]), bool(p.flip[j]))
        else:
            arr = aug.pil_eval(im, cfg)
        arrays.append(arr)
        kept.append(i)
    if arrays:
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    else:
        images = torch.zeros((0, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    return images, np.asarray(kept, dtype=np.int64), skipped


class PlanBatches(IterableDataset):
    """Batches ``start..`` of a plan, split over DataLoader workers by batch number.

    ``fetch(indices) -> list[bytes]`` (JPEG bytes) and ``process(datas, indices)`` are the two
    stages; the torch-gpu backend reuses this class with a process stage that only validates.
    """

    def __init__(self, batches: list[np.ndarray], start: int, fetch, process, stream=None):
        self.batches, self.start, self.stream = batches, start, stream
        self.fetch, self.process = fetch, process

    def __iter__(self):
        info = get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        mine = range(self.start + w, len(self.batches), nw)
        fetch = self.fetch
        if self.stream is not None:
            cache = self.stream(np.concatenate([self.batches[j] for j in mine]) if len(mine) else [])
            fetch = lambda idx: [cache[i] for i in idx.tolist()]  # noqa: E731
        for j in mine:
            index = self.batches[j]
            yield self.process(fetch(index), index)


def stream_samples(shards: ShardSet, shard_url: str, wanted) -> dict[int, bytes]:
    """Stream the shards holding ``wanted`` with webdataset; JPEG bytes by global index (labels checked)."""
    import webdataset as wds

    wanted = np.unique(np.asarray(wanted, dtype=np.int64))
    if wanted.size == 0:
        return {}
    ranges = shards.shard_ranges()
    numbers = np.unique(np.searchsorted(ranges, wanted, side="right") - 1)
    urls = [shard_url_for(shard_url, shards.shard_dir, shards.info["shards"][k]["name"]) for k in numbers]
    keep = set(wanted.tolist())
    out: dict[int, bytes] = {}
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for sample in ds:
        key, url = sample["__key__"], sample.get("__url__", "?")
        where = f"shard {url}, key {key}"
        index = int(key.rsplit("/", 1)[-1])
        if index not in keep:
            continue
        for ext in (fmt.IMAGE_EXT, fmt.LABEL_EXT, fmt.INDEX_EXT):
            if ext not in sample:
                raise ValueError(f"{where}: no .{ext} member")
        if fmt.decode_index(sample[fmt.INDEX_EXT], where) != index:
            raise ValueError(f"{where}: .idx member disagrees with the key")
        check_label(sample[fmt.LABEL_EXT], shards.full, index, where)
        out[index] = sample[fmt.IMAGE_EXT]
    missing = keep.difference(out)
    if missing:
        raise ValueError(f"streamed {urls}: samples {sorted(missing)[:5]} not found")
    return out


def shard_url_for(template: str, shard_dir, name: str) -> str:
    """``template`` with ``{dir}``/``{name}`` filled in; shell-quoted for a ``pipe:`` command.

    ``name`` is already a validated plain shard name (format.validate_info); quoting makes the
    rule hold for the directory too, and for any future field: no metadata reaches a shell raw.
    """
    if template.startswith("pipe:"):
        return template.format(dir=shlex.quote(str(shard_dir)), name=shlex.quote(name))
    return template.format(dir=shard_dir, name=name)


class _Stage:
    """Picklable (fetch, process, stream) callables for the workers."""

    def __init__(self, loader: TorchLoader, epoch: int):
        self.reader = loader.reader
        self.shards, self.url = loader.shards, loader.shard_url
        self.cfg, self.train = aug.AugConfig(loader.image_size), loader.train
        self.seed, self.epoch = loader.seed, epoch
        # a CPU target normalizes in the workers (in parallel); a GPU target gets uint8 (4x less to copy)
        self.normalize_here, self.dtype = loader.device.type == "cpu", loader.dtype

    def fetch(self, index: np.ndarray) -> list[bytes]:
        return [self.reader.read(i) for i in index.tolist()]

    def process(self, datas: list[bytes], index: np.ndarray):
        images, kept, skipped = decode_batch(datas, index, self.cfg, self.train, self.seed, self.epoch)
        if self.normalize_here:
            images = aug.normalize_uint8(images, self.dtype)
        return images, kept, skipped

    def stream(self, wanted) -> dict[int, bytes]:
        return stream_samples(self.shards, self.url, wanted)


def _ignore_preemption_signal(worker_id: int) -> None:
    """SLURM signals every process of a job step; SIGUSR1 (a preemption notice, handled by the
    trainer in the main process) would otherwise terminate the workers (its default action)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def make_dataloader(dataset: PlanBatches, num_workers: int, pin: bool):
    """A DataLoader over whole batches (batch_size=None); in-process when num_workers == 0."""
    if num_workers == 0:
        return iter(dataset)
    return iter(DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin,
                           prefetch_factor=2, persistent_workers=False,
                           worker_init_fn=_ignore_preemption_signal))


class TorchLoader(BaseLoader):
    """webdataset/PIL/torch DataLoader backend (see module docstring)."""

    backend = "torch"

    def __init__(self, shards: ShardSet, *, shard_url: str | None = None, **kw):
        super().__init__(shards, **kw)
        self.shard_url = shard_url
        self.reader = SampleReader(shards.table, shards.full) if shards.table is not None else None
        if self.reader is None and shard_url is None:
            raise ValueError("torch loader needs local shards (a sample table) or shard_url")

    def _produce(self, batches, start):
        stage = _Stage(self, self.epoch)
        stream = stage.stream if self.shard_url is not None else None
        data = PlanBatches(batches, start, stage.fetch, stage.process, stream)
        for images, kept, skipped in make_dataloader(data, self.num_workers, self.device.type == "cuda"):
            images = images.to(self.device, non_blocking=True)
            if images.dtype == torch.uint8:
                images = aug.normalize_uint8(images, self.dtype)
            yield images, kept, skipped
