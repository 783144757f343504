"""Memory bank of known-positive per-class features for SST's cross-image pseudo labels.

For each class c the bank keeps the K most recent features f[b,c] of images with y[b,c] = +1,
newest first (the reference's order: batch positives in batch order, then the old rows, cut to K),
zeros until filled. It is training state, not a parameter: both tensors are persistent buffers, so
they travel in ``state_dict`` and must be identical on every rank (the trainer updates it with the
all-gathered global batch).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import dispatch
from kernels.torch_similarity import EPS

IMPLS = ("reference", "fused", "triton")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


class MemoryBank(nn.Module):
    """FIFO bank (C,K,F) of known-positive features; ``filled`` counts the valid rows per class."""

    bank: torch.Tensor
    filled: torch.Tensor

    def __init__(self, num_classes: int, size: int, dim: int) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("size", size), ("dim", dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MemoryBank {name} must be a positive int, got {v!r}")
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.register_buffer("bank", torch.zeros(num_classes, size, dim), persistent=True)
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.long), persistent=True)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, size={self.size}, dim={self.dim}"

    def _check(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        C, F = self.num_classes, self.dim
        if features.dim() != 3 or features.shape[1:] != (C, F):
            raise ValueError(f"features must be (B,{C},{F}), got shape {tuple(features.shape)}")
        if tuple(labels.shape) != (features.shape[0], C):
            raise ValueError(f"labels must be ({features.shape[0]},{C}), got shape {tuple(labels.shape)}")

    @torch.no_grad()
    def update(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        impl: str = "fused",
        enabled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Push every known-positive f[b,c] (labels == 1) into class c's FIFO, newest first.

        A batch with any NaN/inf feature, or with ``enabled`` (a 0-dim bool tensor) false, leaves
        the bank untouched: one NaN would otherwise poison every later similarity of that class.
        The choice is made on the device (no host synchronisation); the returned 0-dim bool tensor
        says whether the batch went in.
        """
        _check_impl(impl)
        self._check(features, labels)
        ok = torch.isfinite(features).all()
        if enabled is not None:
            ok = ok & enabled.to(ok.device)
        backend = "triton" if impl == "triton" else "torch"
        zero = torch.zeros((), dtype=features.dtype, device=features.device)
        clean = torch.where(ok, features.detach(), zero)
        new = dispatch.bank_update(self.bank, clean, labels, backend=backend)
        self.bank.copy_(torch.where(ok.to(new.device), new, self.bank))
        n_pos = (labels == 1).sum(dim=0).to(self.filled.device) * ok.to(self.filled.device)
        self.filled.copy_((self.filled + n_pos).clamp_max(self.size))
        return ok

    @torch.no_grad()
    def similarity_reference(self, features: torch.Tensor) -> torch.Tensor:
        """Literal sim[b,c] = mean_k cos(f[b,c], bank[c,k]) over all B*C*K cosines (zero slot -> 0)."""
        dt = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
        f, m = features.to(dt), self.bank.to(dt)
        dots = torch.einsum("bcf,ckf->bck", f, m)
        norms = f.norm(dim=-1).clamp_min(EPS).unsqueeze(-1) * m.norm(dim=-1).clamp_min(EPS).unsqueeze(0)
        return (dots / norms).mean(dim=-1)

    @torch.no_grad()
    def pseudo_labels(
        self, features: torch.Tensor, labels: torch.Tensor, margin: float, impl: str = "fused"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sim (B,C), completed labels): unknown (0) entries with sim >= margin become +1.

        Call after ``update`` with the same batch (the reference's order). ``impl`` "reference"
        computes every cosine literally, "fused" uses the mean-of-normalized-rows identity
        (kernels backend torch), "triton" the Triton kernel; all three agree.
        """
        _check_impl(impl)
        self._check(features, labels)
        if impl == "reference":
            sim = self.similarity_reference(features.detach())
            completed = torch.where((labels == 0) & (sim >= margin), torch.ones_like(labels), labels)
            return sim, completed
        backend = "triton" if impl == "triton" else "torch"
        return dispatch.bank_pseudo_labels(features.detach(), self.bank, labels, margin, backend=backend)
