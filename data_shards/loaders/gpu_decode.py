"""torch-gpu backend: workers read and validate JPEG bytes; torchvision decodes a batch on the GPU.

``torchvision.io.decode_jpeg(list, device="cuda")`` decodes the batch with nvJPEG; the transforms
are batched torch ops on the device: the first resize per group of equal input shapes, the crop
as one gather per crop side (5 sides), the second resize per side, flip by ``torch.where``.
Intermediate images are rounded to uint8 like PIL's, so the result follows the PIL pipeline
within resampling differences. On a CPU device the same code runs with the CPU decoder (tests).
"""

from __future__ import annotations

import numpy as np
import torch

from data_shards.loaders.augment import AugConfig, normalize_uint8, train_params
from data_shards.loaders.common import BaseLoader, SampleReader, ShardSet, jpeg_is_valid
from data_shards.loaders.torch_loader import PlanBatches, make_dataloader


def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic antialiased resize of uint8 (B,3,h,w) to (B,3,size,size), rounded back to uint8."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    y = F.resize(x.float(), [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _resize_groups(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Resize decoded images of mixed shapes: one batched resize per distinct shape."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=images[0].device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(k)
    for members in groups.values():
        out[members] = _resize_uint8(torch.stack([images[k] for k in members]), size)
    return out


def _crop_resize(base: torch.Tensor, cfg: AugConfig, side: np.ndarray, x: np.ndarray,
                 y: np.ndarray) -> torch.Tensor:
    """Square crops (per-sample side, corner) of (B,3,base,base) resized to image_size; a gather per side."""
    dev = base.device
    out = torch.empty((base.shape[0], 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=dev)
    for s in np.unique(side):
        pos = np.flatnonzero(side == s)
        ar = torch.arange(int(s), device=dev)
        rows = torch.as_tensor(y[pos], device=dev)[:, None] + ar          # (G, s)
        cols = torch.as_tensor(x[pos], device=dev)[:, None] + ar
        b = torch.as_tensor(pos, device=dev)[:, None, None]
        crops = base[b, :, rows[:, :, None], cols[:, None, :]]             # (G, s, s, 3)
        out[torch.as_tensor(pos, device=dev)] = _resize_uint8(crops.permute(0, 3, 1, 2), cfg.image_size)
    return out


def transform_encoded(datas: list[torch.Tensor], index: np.ndarray, cfg: AugConfig, train: bool, seed: int,
                      epoch: int, device: torch.device) -> torch.Tensor:
    """Encoded JPEGs (uint8 1-D tensors) -> augmented uint8 (B,3,S,S) on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return torch.zeros((0, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=device)
    images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    return transform_decoded(images, index, cfg, train, seed, epoch)


def transform_decoded(images: list[torch.Tensor], index: np.ndarray, cfg: AugConfig, train: bool, seed: int,
                      epoch: int) -> torch.Tensor:
    """Decoded uint8 (3,h,w) images -> augmented uint8 (B,3,S,S) on their device."""
    if not train:
        return _resize_groups(images, cfg.image_size)
    device = images[0].device
    p = train_params(cfg, seed, epoch, index)
    out = _crop_resize(_resize_groups(images, cfg.base), cfg, p.side, p.x, p.y)
    flip = torch.as_tensor(p.flip, device=device)[:, None, None, None]
    return torch.where(flip, out.flip(-1), out)


class _Stage:
    def __init__(self, reader: SampleReader):
        self.reader = reader

    def fetch(self, index: np.ndarray) -> list[bytes]:
        return [self.reader.read(i) for i in index.tolist()]

    def process(self, datas: list[bytes], index: np.ndarray):
        ok = np.array([jpeg_is_valid(d) for d in datas], dtype=bool)
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d, good in zip(datas, ok) if good]
        return tensors, index[ok], index[~ok].tolist()


class GpuDecodeLoader(BaseLoader):
    """Batched torchvision decode + torch transforms on ``device`` (meant for CUDA)."""

    backend = "torch-gpu"

    def __init__(self, shards: ShardSet, **kw):
        super().__init__(shards, **kw)
        if shards.table is None:
            raise ValueError("the torch-gpu backend reads local shards with their index files")
        self.reader = SampleReader(shards.table, shards.full)

    def _produce(self, batches, start):
        cfg = AugConfig(self.image_size)
        stage = _Stage(self.reader)
        data = PlanBatches(batches, start, stage.fetch, stage.process)
        for datas, kept, skipped in make_dataloader(data, self.num_workers, False):
            images = transform_encoded(datas, kept, cfg, self.train, self.seed, self.epoch, self.device)
            yield normalize_uint8(images, self.dtype), kept, skipped
