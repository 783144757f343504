"""Loaders that stream the WebDataset shards into Batches, with one data plan for every backend.

``build_loader`` picks a backend; all of them read the same samples per (seed, epoch, rank) in the
same batches (see :mod:`data_shards.loaders.common`) and draw the same augmentation choices
(:mod:`data_shards.loaders.augment`), so switching backends changes only pixel arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_shards.loaders.common import BaseLoader, Batch, open_shard_set

__all__ = ["Batch", "BaseLoader", "build_loader", "BACKENDS", "AUTO_CPU_BACKEND"]

BACKENDS = ("auto", "dali", "torch", "torch-gpu")
# CPU default of backend="auto", chosen by benchmarks/loader.py (benchmarks/results/loader-2026-11-27.json):
# train augmentation at 448 on 640x480 ~100 KB JPEGs costs 16-17 CPU ms/image with torch (PIL) and
# 20-21 with DALI's CPU operators, at 1 and 2 workers.
AUTO_CPU_BACKEND = "torch"


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> DALI when installed (mixed decoder on a GPU device), else the measured CPU default."""
    from data_shards.loaders.dali_loader import dali_available

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "dali" if dali_available() else "torch-gpu"
    return AUTO_CPU_BACKEND if AUTO_CPU_BACKEND != "dali" or dali_available() else "torch"


def build_loader(shard_dir: str | Path, split: str, train: bool = True, batch_size: int = 8,
                 image_size: int = 448, proportion: float = 1.0, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, backend: str = "auto",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 num_classes: int | None = None, drop_last: bool | None = None,
                 shard_url: str | None = None, dali_reader: str = "external",
                 label_seed: int = 0) -> BaseLoader:
    """A loader over split ``split`` of ``shard_dir`` for this rank; see docs/architecture.md "Data API".

    ``proportion``/``label_seed`` give the partial labels (DESIGN §4; label_seed 0 is the protocol's,
    kept apart from ``seed`` so training seeds vary without changing which labels are known);
    ``seed`` seeds the per-epoch permutation and the augmentation. ``drop_last`` defaults to ``train``.
    ``shard_url`` (torch backend only), e.g. ``"pipe:curl -s http://host/{name}"`` or
    ``"{dir}/{name}"``, streams the shards through webdataset instead of random access.
    ``dali_reader="webdataset"`` (DALI, eval only) reads with ``fn.readers.webdataset`` (shard_id =
    rank, num_shards = world_size) instead of the plan-fed external source; same samples.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} requested but CUDA is not available")
    name = resolve_backend(backend, device)
    if shard_url is not None and name != "torch":
        raise ValueError(f"shard_url streams through webdataset: backend 'torch' only, got {name!r}")
    shards = open_shard_set(shard_dir, split, proportion, label_seed, num_classes,
                            with_table=shard_url is None)
    kw = dict(train=train, batch_size=batch_size, image_size=image_size, seed=seed, rank=rank,
              world_size=world_size, num_workers=num_workers, device=device, dtype=dtype,
              drop_last=train if drop_last is None else drop_last)
    if name == "dali":
        from data_shards.loaders.dali_loader import DaliLoader

        return DaliLoader(shards, dali_reader=dali_reader, **kw)
    if name == "torch-gpu":
        from data_shards.loaders.gpu_decode import GpuDecodeLoader

        return GpuDecodeLoader(shards, **kw)
    from data_shards.loaders.torch_loader import TorchLoader

    return TorchLoader(shards, shard_url=shard_url, **kw)
