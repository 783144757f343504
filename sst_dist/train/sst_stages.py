"""The stages of one distributed SST step, each a public function the profiler times by name.

:class:`sst_dist.train.state.DistributedSST` runs them in this order (:data:`STAGES`):

1. ``gather``: one all-gather of a packed buffer per rank (features, labels, the rank's
   "outputs finite" flag), rows padded to ``train.batch_size`` so no size exchange and no
   ``.item()`` is needed; padded rows are unknown labels and zero features, so they push nothing
   into the bank and add no contrastive entry.
2. ``update_bank``: the bank takes the global batch unless some rank's outputs were not finite
   (decided on the device).
3. ``pseudo_labels``: intra and inter completed labels and their quality counts (from E0 on).
4. ``terms``: :func:`sst_dist.losses.sst_terms`, the one loss path.
5. ``reduce``: one all-reduce of every row term's numerator and denominator, the pseudo-label
   counts and the preemption flag; the weighted loss of :func:`sst_dist.losses.total_loss` with
   the global denominators, times the world size (DeepSpeed averages gradients).

Nothing here reads a device tensor on the host: values for logs stay on the device in
:class:`StepResult` until a logging step asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist

from sst_dist.train import distributed as D

STAGES = ("gather", "update_bank", "pseudo_labels", "terms", "reduce")
ROW_TERMS = ("bce", "intra", "inter", "cooc")
PSEUDO_STATS = ("intra_new", "intra_correct", "inter_new", "inter_correct", "unknown_pos")


@dataclass
class Gathered:
    """The global batch every rank sees: features (local rows keep their gradient), labels, and
    whether every rank's outputs were finite (0-dim bool, equal on all ranks)."""

    features: torch.Tensor
    labels: torch.Tensor
    finite: torch.Tensor


def outputs_finite(out: Any) -> torch.Tensor:
    """0-dim bool: logits, pair logits and features all finite (no host read)."""
    return torch.stack([torch.isfinite(t).all() for t in (out.logits, out.pair_logits, out.features)]).all()


def gather(out: Any, labels: torch.Tensor, pad_to: int) -> Gathered:
    """All ranks' features and labels in rank order (global batch order) with one all-gather."""
    feats, finite = out.features, outputs_finite(out)
    world = D.world_size()
    if world == 1:
        return Gathered(feats, labels, finite)
    B, C, F = feats.shape
    if B > pad_to:
        raise ValueError(f"batch of {B} rows on rank {D.rank()} exceeds train.batch_size={pad_to}")
    dt = torch.promote_types(feats.dtype, torch.float32)
    packed = torch.zeros(pad_to, C * F + C + 1, dtype=dt, device=feats.device)
    packed[:B, : C * F] = feats.detach().reshape(B, C * F).to(dt)
    packed[:B, C * F : C * F + C] = labels.to(dt)
    packed[:, -1] = finite.to(dt)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed)
    every = torch.stack(parts)  # (W, pad, C*F + C + 1)
    rows = list(every[..., : C * F].reshape(world, pad_to, C, F).unbind(0))
    local = feats.to(dt)
    if B < pad_to:
        local = torch.cat([local, local.new_zeros(pad_to - B, C, F)])
    rows[D.rank()] = local  # this rank's rows keep their gradient
    g_labels = every[..., C * F : C * F + C].reshape(world * pad_to, C).to(labels.dtype)
    return Gathered(torch.cat(rows), g_labels, (every[:, 0, -1] > 0).all())


@dataclass
class StepResult:
    """One micro-batch: the loss to backpropagate and device tensors for logs.

    ``ok`` (0-dim bool, equal on all ranks) says whether the step may update anything; the host
    values (``finite``, ``global_loss``, ``terms``, ``pseudo``, ``stop_requested``) are read with
    one transfer the first time one of them is asked for, i.e. on logging steps only.
    """

    loss: torch.Tensor
    ok: torch.Tensor
    report: torch.Tensor  # [total, *term values, *pseudo counts, stop]
    names: tuple[str, ...]
    weights: dict[str, float]

    @cached_property
    def host(self) -> tuple[bool, list[float]]:
        vals = torch.cat([self.ok.reshape(1).to(self.report.dtype), self.report]).tolist()
        return bool(vals[0]), vals[1:]

    @property
    def finite(self) -> bool:
        return self.host[0]

    @property
    def global_loss(self) -> float:
        return self.host[1][0] if self.finite else float("nan")

    @property
    def terms(self) -> dict[str, float]:
        if not self.finite:
            return {}
        return dict(zip(self.names, self.host[1][1 : 1 + len(self.names)]))

    @property
    def pseudo(self) -> dict[str, float]:
        if not self.finite:
            return {}
        start = 1 + len(self.names)
        return dict(zip(PSEUDO_STATS, self.host[1][start : start + len(PSEUDO_STATS)]))

    @property
    def stop_requested(self) -> bool:
        """Some rank had a preemption signal before this step's all-reduce."""
        return self.host[1][-1] > 0


@torch.no_grad()
def pseudo_stats(
    labels: torch.Tensor, intra: torch.Tensor, inter: torch.Tensor, full: torch.Tensor | None
) -> torch.Tensor:
    """Counts (float64, on the device): new pseudo positives, how many are truly positive, and
    unknown positives; zeros without full labels."""
    if full is None:
        return torch.zeros(len(PSEUDO_STATS), dtype=torch.float64, device=labels.device)
    unknown = labels == 0
    truth = full.to(labels.device, non_blocking=True) == 1
    new_intra = unknown & (intra == 1)
    new_inter = unknown & (inter == 1)
    parts = [new_intra, new_intra & truth, new_inter, new_inter & truth, unknown & truth]
    return torch.stack([p.sum() for p in parts]).double()
