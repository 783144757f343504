"""Augmentation semantics shared by all backends (DESIGN §3), so they differ only in pixel arithmetic.

Train: resize to ``base`` x ``base`` (512 at image size 448) bicubic, square crop of a side drawn
from {512, 448, 384, 320, 256} (scaled by image_size / 448) at a random position, resize to
``image_size`` bicubic, horizontal flip with probability 1/2, ImageNet mean/std.
Eval: resize to ``image_size`` bicubic, normalize.

The random choices of a sample are a counter-based hash of (seed, epoch, global index): no
generator state to carry between processes, identical in every backend and worker, vectorized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROP_SIDES_448 = (512, 448, 384, 320, 256)
BASE_448 = 512


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 (wrapping arithmetic)."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_hash(seed: int, epoch: int, index: np.ndarray, stream: int) -> np.ndarray:
    """A uint64 per index, independent across (seed, epoch, index, stream)."""
    with np.errstate(over="ignore"):
        h = _mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(0x9E3779B97F4A7C15))
        h = _mix64(h ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
        h = _mix64(h ^ np.uint64(stream))
        return _mix64(h ^ np.asarray(index, dtype=np.int64).astype(np.uint64))


@dataclass(frozen=True)
class AugConfig:
    """Sizes of the two pipelines at one image size."""

    image_size: int = 448

    @property
    def base(self) -> int:
        return round(BASE_448 * self.image_size / 448)

    @property
    def sides(self) -> tuple[int, ...]:
        return tuple(min(self.base, round(s * self.image_size / 448)) for s in CROP_SIDES_448)


@dataclass(frozen=True)
class TrainParams:
    """Per-sample random choices: crop side, crop top-left (x, y) on the base image, flip."""

    side: np.ndarray
    x: np.ndarray
    y: np.ndarray
    flip: np.ndarray


def train_params(cfg: AugConfig, seed: int, epoch: int, index: np.ndarray) -> TrainParams:
    """The random choices of the samples ``index`` in ``epoch``."""
    index = np.asarray(index, dtype=np.int64)
    sides = np.asarray(cfg.sides, dtype=np.int64)
    side = sides[(sample_hash(seed, epoch, index, 0) % np.uint64(len(sides))).astype(np.int64)]
    room = (cfg.base - side + 1).astype(np.uint64)
    x = (sample_hash(seed, epoch, index, 1) % room).astype(np.int64)
    y = (sample_hash(seed, epoch, index, 2) % room).astype(np.int64)
    flip = (sample_hash(seed, epoch, index, 3) & np.uint64(1)).astype(bool)
    return TrainParams(side, x, y, flip)


def normalize_uint8(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B,3,H,W) -> ImageNet-normalized ``dtype``, on the tensor's device."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255.0)
    out = images.to(torch.float32)  # one new tensor, then in place: this runs at memory speed
    return out.sub_(mean).mul_(inv_std).to(dtype)


# ----------------------------------------------------------------------------------------------
# PIL implementation (the torch CPU backend)
# ----------------------------------------------------------------------------------------------
def pil_decode(data: bytes, where: str | None = None):
    """Decode to the 8-bit RGB picture a viewer shows (:func:`data_shards.images.open_rgb`)."""
    from data_shards.images import open_rgb

    return open_rgb(data, where=where)


def pil_train(im, cfg: AugConfig, side: int, x: int, y: int, flip: bool) -> np.ndarray:
    """Train augmentation of one PIL image -> uint8 HWC array (ImageNet normalization comes later)."""
    from PIL import Image

    im = im.resize((cfg.base, cfg.base), Image.Resampling.BICUBIC)
    im = im.crop((x, y, x + side, y + side))
    im = im.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im)


def pil_eval(im, cfg: AugConfig) -> np.ndarray:
    """Eval transform of one PIL image -> uint8 HWC array."""
    from PIL import Image

    return np.asarray(im.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC))


def eval_tensor(im, image_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The loaders' eval transform of one decoded RGB image -> normalized (3, S, S) tensor.

    ``predict`` uses it on ``open_rgb(path)`` so single images get exactly the loaders' pixels.
    """
    arr = pil_eval(im, AugConfig(image_size))
    return normalize_uint8(torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None].contiguous(), dtype)[0]
