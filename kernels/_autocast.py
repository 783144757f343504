"""Autocast handling for the fused PyTorch head forms on any device.

On CUDA, ``torch.amp.custom_fwd(cast_inputs=float32)`` runs the autograd Functions in float32.
That decorator covers one device type only, so under CPU (or other) autocast the ops inside the
Function would be cast piecewise and mix dtypes. This context gives the same behaviour there:
float32 inputs and autocast off for the Function's own ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def float32_outside_cuda_autocast(like: torch.Tensor) -> Iterator[Callable[..., tuple[torch.Tensor, ...]]]:
    device_type = like.device.type
    if device_type == "cuda" or not torch.is_autocast_enabled(device_type):
        yield lambda *ts: ts
        return
    with torch.autocast(device_type, enabled=False):
        yield lambda *ts: tuple(t.float() for t in ts)
