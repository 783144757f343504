"""Where a training batch is made ready for the step, and the epoch's sums kept on the device.

``prepare_batch`` is the one place a batch's labels are validated (on the host copy, so no
device synchronisation) and where images reach the device in the training dtype: pinned and
copied asynchronously when the loader left them on the host, untouched when the loader already
delivered them there (``build_loader(device=..., dtype=...)``). On CUDA the images are handed
to the trunk in channels-last layout (the conv weights too: ``engine_setup.place_model``).
"""

from __future__ import annotations

from typing import Any

import torch

from sst_dist.pseudo import check_labels
from sst_dist.train.sst_stages import PSEUDO_STATS, StepResult


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` (and in ``dtype``) without a synchronising copy: host tensors are pinned
    first, so the copy is asynchronous; a tensor already in place is returned as is."""
    if t.device != device and device.type == "cuda":
        t = (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    elif t.device != device:
        t = t.to(device)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def trunk_layout(images: torch.Tensor) -> torch.Tensor:
    """Images in the layout the trunk runs fastest in: channels-last on CUDA (as its weights,
    ``engine_setup.place_model``), unchanged elsewhere."""
    return images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images


def prepare_batch(
    batch: Any, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images in ``dtype`` on ``device``, partial labels as float, full labels or None)."""
    partial = batch.partial
    if partial.device.type == "cpu":  # the loader's host copy: checking it costs no device sync
        check_labels(partial, "batch.partial")
    images = trunk_layout(to_device(batch.images, device, dtype))
    labels = to_device(partial, device, torch.float32)
    full = getattr(batch, "full", None)
    return images, labels, None if full is None else to_device(full, device)


class EpochSums:
    """Sums of finite steps' loss terms and pseudo-label counts, accumulated on the device.

    The term layout is fixed within an epoch (pseudo terms are on or off for all of it), so the
    report vectors add up elementwise; :meth:`read` is the epoch's one host transfer.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.names: tuple[str, ...] = ()

    def add(self, res: StepResult) -> None:
        row = torch.cat([res.ok.reshape(1).to(res.report.dtype), res.report[:-1]])  # drop the stop flag
        row = torch.where(res.ok, row, torch.zeros_like(row))
        if self.total is None or self.total.shape != row.shape:
            self.total, self.names = row, res.names
        else:
            self.total = self.total + row

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and strings (a checkpoint loads them without unpickling code)."""
        return {"total": None if self.total is None else self.total.detach().cpu(), "names": list(self.names)}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Continue a mid-epoch checkpoint's sums, so the epoch's means cover all of its steps."""
        total = state.get("total")
        self.total = None if total is None else total.to(device)
        self.names = tuple(state.get("names", ()))

    def read(self) -> tuple[dict[str, float], dict[str, float], int]:
        """(sums of loss and terms, sums of pseudo counts, finite step count)."""
        if self.total is None:
            return {}, {}, 0
        vals = self.total.tolist()
        count = int(round(vals[0]))
        if count == 0:
            return {}, {}, 0
        keys = ("loss", *self.names)
        sums = dict(zip(keys, vals[1 : 1 + len(keys)]))
        pseudo = dict(zip(PSEUDO_STATS, vals[1 + len(keys) :]))
        return sums, pseudo, count
