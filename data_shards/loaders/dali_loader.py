"""DALI backend: encoded samples of the shared plan -> DALI decode, bicubic resize, crop, mirror, normalize.

Why not ``fn.readers.webdataset`` for training: it shards the sample list by its own
``shard_id``/``num_shards`` rule (contiguous blocks, the same blocks every epoch) and shuffles
with its own buffer and seed, so it cannot produce the per-epoch global permutation the other
backends use, nor skip a corrupt JPEG (the decoder raises inside the pipeline). The training
pipeline therefore takes its samples from ``fn.external_source``: a Python iterable that reads
the plan's samples by random access with the offsets of the same DALI index files
(``X.tar.idx``) the webdataset reader would use, checks label and index members, and drops
invalid JPEGs before DALI sees them. Decoding and augmentation are DALI operators (mixed
decoder on GPU, CPU decoder otherwise). The crop position and flip come in as per-sample
arguments, computed by :func:`augment.train_params` exactly as for the other backends.

Evaluation can instead use ``fn.readers.webdataset`` itself (``dali_reader="webdataset"``):
with the index files, ``shard_id=rank``, ``num_shards=world_size``, no shuffle and
``pad_last_batch=True``, DALI's shards are the contiguous blocks ``[N*r//W, N*(r+1)//W)`` padded
with the block's last sample, which is exactly the eval plan of :mod:`common`; every batch is
checked against the plan by its ``.idx`` members. In that mode a corrupt JPEG stops the epoch
with DALI's error instead of being skipped.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from data_shards.loaders.augment import MEAN, STD, AugConfig, train_params
from data_shards.loaders.common import BaseLoader, SampleReader, ShardSet, check_label, jpeg_is_valid


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class _PlanSource:
    """The external_source iterable: one tuple of per-sample arrays per non-empty batch of the plan.

    Batches are prepared once and cached, so the consumer can learn that a batch had no valid
    sample (it yields an empty batch, DALI never sees it) while DALI's prefetch runs ahead.
    """

    def __init__(self, loader: DaliLoader, batches: list[np.ndarray], start: int, epoch: int):
        self.reader, self.cfg, self.train = loader.reader, AugConfig(loader.image_size), loader.train
        self.seed, self.epoch, self.batches, self.start = loader.seed, epoch, batches, start
        self._cache: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def prepare(self, j: int) -> tuple:
        """(outputs or None if every sample is bad, kept indices, skipped indices) of batch ``j``."""
        with self._lock:
            if j in self._cache:
                return self._cache[j]
            index = self.batches[j]
            datas = [self.reader.read(i) for i in index.tolist()]
            ok = np.array([jpeg_is_valid(d) for d in datas], dtype=bool)
            kept, skipped = index[ok], index[~ok].tolist()
            outputs = None
            if kept.size:
                jpegs = [np.frombuffer(d, dtype=np.uint8) for d, good in zip(datas, ok) if good]
                if self.train:
                    p = train_params(self.cfg, self.seed, self.epoch, kept)
                    room = (self.cfg.base - p.side).astype(np.float64)
                    # DALI's crop anchor is round(pos * (base - side)): an exact normalized position
                    pos_x = np.where(room > 0, p.x / np.maximum(room, 1), 0.0)
                    pos_y = np.where(room > 0, p.y / np.maximum(room, 1), 0.0)
                    args = [p.side.astype(np.float32), pos_x.astype(np.float32), pos_y.astype(np.float32),
                            p.flip.astype(np.int32)]
                    outputs = (jpegs, *[list(a.reshape(-1, 1)) for a in args], list(kept.reshape(-1, 1)))
                else:
                    outputs = (jpegs, list(kept.reshape(-1, 1)))
            self._cache[j] = (outputs, kept, skipped)
            return self._cache[j]

    def __iter__(self):
        for j in range(self.start, len(self.batches)):
            outputs, _, _ = self.prepare(j)
            if outputs is not None:
                yield outputs


def _build_pipeline(source: _PlanSource, batch_size: int, num_threads: int, device_id: int | None,
                    cfg: AugConfig, train: bool, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    mean = [255.0 * m for m in MEAN]
    std = [255.0 * s for s in STD]

    @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        if train:
            jpegs, side, pos_x, pos_y, flip, index = fn.external_source(
                source=source, num_outputs=6, batch=True, cycle="raise",
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32, types.INT64])
        else:
            jpegs, index = fn.external_source(source=source, num_outputs=2, batch=True, cycle="raise",
                                              dtype=[types.UINT8, types.INT64])
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if train:
            images = fn.resize(images, resize_x=cfg.base, resize_y=cfg.base, interp_type=types.INTERP_CUBIC,
                               antialias=True)
            images = fn.crop(images, crop_w=side[0], crop_h=side[0], crop_pos_x=pos_x[0], crop_pos_y=pos_y[0])
            images = fn.resize(images, resize_x=cfg.image_size, resize_y=cfg.image_size,
                               interp_type=types.INTERP_CUBIC, antialias=True)
            images = fn.crop_mirror_normalize(images, mirror=flip[0], mean=mean, std=std, dtype=types.FLOAT,
                                              output_layout="CHW")
        else:
            images = fn.resize(images, resize_x=cfg.image_size, resize_y=cfg.image_size,
                               interp_type=types.INTERP_CUBIC, antialias=True)
            images = fn.crop_mirror_normalize(images, mean=mean, std=std, dtype=types.FLOAT,
                                              output_layout="CHW")
        return images, index

    p = pipe()
    p.build()
    return p


def _build_reader_pipeline(shards: ShardSet, batch_size: int, num_threads: int, device_id: int | None,
                           cfg: AugConfig, rank: int, world_size: int, seed: int):
    """Eval pipeline around ``fn.readers.webdataset`` (see module docstring)."""
    from nvidia.dali import fn, pipeline_def, types

    from data_shards import format as fmt

    shards.table.check_headers()  # DALI's native reader trusts the index: every entry must match the tar
    paths = [str(p) for p in shards.table.shard_paths]
    index_paths = [str(fmt.dali_index_path(p)) for p in paths]
    missing = [p for p in index_paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"dali_reader='webdataset' needs the DALI index files; missing {missing[:3]}")

    @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=seed,
                  exec_dynamic=True)
    def pipe():
        jpegs, labels, index = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=[fmt.IMAGE_EXT, fmt.LABEL_EXT, fmt.INDEX_EXT],
            shard_id=rank, num_shards=world_size, random_shuffle=False, pad_last_batch=True,
            stick_to_shard=True, missing_component_behavior="error", name="reader")
        images = fn.decoders.image(jpegs, device="mixed" if device_id is not None else "cpu",
                                   output_type=types.RGB)
        images = fn.resize(images, resize_x=cfg.image_size, resize_y=cfg.image_size,
                           interp_type=types.INTERP_CUBIC, antialias=True)
        mean, std = [255.0 * m for m in MEAN], [255.0 * s for s in STD]
        images = fn.crop_mirror_normalize(images, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")
        return images, labels, index

    p = pipe()
    p.build()
    return p


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) -> torch tensor on ``device``."""
    from nvidia.dali.backend import TensorListGPU

    if isinstance(tl, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tl.as_array())).to(device)


class DaliLoader(BaseLoader):
    """DALI pipeline per epoch pass (see module docstring); ``num_workers`` = DALI CPU threads."""

    backend = "dali"

    def __init__(self, shards: ShardSet, dali_reader: str = "external", **kw):
        super().__init__(shards, **kw)
        if dali_reader not in ("external", "webdataset"):
            raise ValueError(f"dali_reader must be 'external' or 'webdataset', got {dali_reader!r}")
        if dali_reader == "webdataset" and (self.train or self.drop_last):
            raise ValueError("dali_reader='webdataset' is for evaluation (train=False, drop_last=False): its "
                             "fixed contiguous shards cannot follow the per-epoch training permutation")
        self.dali_reader = dali_reader
        if not dali_available():
            raise ImportError("backend 'dali' needs nvidia-dali (pip install nvidia-dali-cuda130)")
        if shards.table is None:
            raise ValueError("the DALI backend reads local shards (mounted paths) with their index files")
        self.reader = SampleReader(shards.table, shards.full)
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else None

    def _produce(self, batches, start):
        if self.dali_reader == "webdataset":
            yield from self._produce_reader(batches, start)
            return
        cfg = AugConfig(self.image_size)
        source = _PlanSource(self, batches, start, self.epoch)
        pipe = _build_pipeline(source, self.batch_size, self.num_workers, self.device_id, cfg, self.train,
                               self.seed)
        try:
            for j in range(start, len(batches)):
                outputs, kept, skipped = source.prepare(j)
                if outputs is None:
                    empty = torch.zeros((0, 3, self.image_size, self.image_size), device=self.device)
                    yield empty, kept, skipped
                    continue
                images, index = pipe.run()
                got = np.array(index.as_array()).reshape(-1)
                if not np.array_equal(got, kept):
                    raise RuntimeError(f"DALI output batch {j} holds {got[:4]}..., expected {kept[:4]}...")
                yield _to_torch(images, self.device), kept, skipped
        finally:
            del pipe

    def _produce_reader(self, batches, start):
        from data_shards import format as fmt

        pipe = _build_reader_pipeline(self.shards, self.batch_size, self.num_workers, self.device_id,
                                      AugConfig(self.image_size), self.rank, self.world_size, self.seed)
        try:
            for j in range(len(batches)):
                images, labels, index = pipe.run()
                if j < start:
                    continue
                want = batches[j]
                got = [fmt.decode_index(bytes(np.array(t)), "dali reader") for t in index]
                got = np.array(got[: len(want)])
                if not np.array_equal(got, want):
                    raise RuntimeError(f"fn.readers.webdataset batch {j} of rank {self.rank} holds "
                                       f"{got[:4]}..., the eval plan says {want[:4]}...")
                for i, raw in zip(got.tolist(), labels):
                    check_label(bytes(np.array(raw)), self.shards.full, i, self.reader.where(i))
                yield _to_torch(images, self.device)[: len(want)], want, []
        finally:
            del pipe
