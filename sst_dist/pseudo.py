"""Intra-image pseudo labels, the margin schedule, and label-tensor validation.

Intra-image transfer (DESIGN §3): the pair head's probabilities Pm = sigmoid(q) form an
image-specific symmetric C x C co-occurrence matrix with unit diagonal. For an unknown label c,
s_c = sum_j Pm[c,j] [y_j = +1] / max(1, #known positives); it becomes +1 where s_c >= margin.
Known entries (+1/-1) never change, and unknown entries only ever become +1 (never -1).

Label values are checked once, where the batch is made (:func:`check_labels`, called by the
trainer on the host copy and by :func:`sst_dist.losses.sst_loss_terms`): a value check on a device
tensor is a host synchronisation, so the per-step functions here check shapes only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def check_labels(labels: torch.Tensor, name: str = "labels") -> None:
    """Raise ValueError unless ``labels`` is a (B,C) tensor with values in {+1, 0, -1}.

    Reads the values on the host: call it once per batch where the batch is made, not per term."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 2:
        raise ValueError(f"{name} must be (B,C), got shape {tuple(labels.shape)}")
    ok = (labels == 1) | (labels == 0) | (labels == -1)
    if not bool(ok.all()):
        bad = torch.unique(labels[~ok].detach().float().cpu())[:8].tolist()
        raise ValueError(f"{name} must contain only 1, 0, -1; found other values {bad}")


def pseudo_enabled(epoch: int, warmup_epochs: int) -> bool:
    """The one warm-up rule: pseudo labels and their BCE terms count from ``warmup_epochs`` on."""
    return epoch >= warmup_epochs


def num_pairs(num_classes: int) -> int:
    """P = C(C-1)/2 class pairs i<j."""
    return num_classes * (num_classes - 1) // 2


def cooccurrence_matrix(pair_logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pm (B,C,C): sigmoid(pair_logits) laid symmetrically over pairs i<j (row-major), unit diagonal."""
    B, C = pair_logits.shape[0], num_classes
    i, j = torch.triu_indices(C, C, 1, device=pair_logits.device)
    prob = torch.sigmoid(pair_logits)
    pm = torch.zeros(B, C, C, dtype=prob.dtype, device=prob.device)
    pm[:, i, j] = prob
    pm[:, j, i] = prob
    pm.diagonal(dim1=1, dim2=2).fill_(1.0)
    return pm


@torch.no_grad()
def intra_scores(pair_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """s (B,C): mean of Pm[c, j] over the image's known positives j (0 when it has none)."""
    B, C = labels.shape
    if pair_logits.dim() != 2 or tuple(pair_logits.shape) != (B, num_pairs(C)):
        raise ValueError(
            f"pair_logits must be (B, C(C-1)/2) = ({B}, {num_pairs(C)}) for labels of shape "
            f"{tuple(labels.shape)}, got {tuple(pair_logits.shape)}"
        )
    dt = pair_logits.dtype if pair_logits.dtype in (torch.float32, torch.float64) else torch.float32
    pm = cooccurrence_matrix(pair_logits.detach().to(dt), C)
    pos = (labels == 1).to(dt)  # (B,C)
    s = torch.bmm(pm, pos.unsqueeze(-1)).squeeze(-1)
    return s / pos.sum(dim=1, keepdim=True).clamp_min(1.0)


@torch.no_grad()
def intra_pseudo_labels(pair_logits: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Labels with unknown entries set to +1 where s_c >= margin; same dtype/device as ``labels``.

    ``labels`` must already be valid (:func:`check_labels`); only shapes are checked here."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B,C), got shape {tuple(labels.shape)}")
    s = intra_scores(pair_logits, labels)
    return torch.where((labels == 0) & (s >= margin), torch.ones_like(labels), labels)


@dataclass(frozen=True)
class MarginSchedule:
    """Pseudo-label margins: ``start`` until the first epoch >= warmup ends, then -step per epoch.

    Follows the reference's training loop: after finishing an epoch e >= warmup_epochs the margin
    becomes max(floor, m - step). So epochs 0..warmup_epochs use ``start`` (no pseudo labels before
    warmup_epochs), epoch warmup_epochs+1 uses start - step, ... down to ``floor``. The same
    schedule drives both the intra and the inter margin.
    """

    start: float = 0.95
    floor: float = 0.75
    step: float = 0.025
    warmup_epochs: int = 5

    def __post_init__(self) -> None:
        if not 0.0 < self.floor <= self.start:
            raise ValueError(
                f"MarginSchedule needs 0 < floor <= start, got floor={self.floor}, start={self.start}"
            )
        if self.step < 0:
            raise ValueError(f"MarginSchedule.step must be >= 0, got {self.step}")
        if self.warmup_epochs < 0:
            raise ValueError(f"MarginSchedule.warmup_epochs must be >= 0, got {self.warmup_epochs}")

    def margin(self, epoch: int) -> float:
        """Margin in force during ``epoch`` (0-based); repeated subtraction as the reference does."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        m = self.start
        for _ in range(max(0, epoch - self.warmup_epochs)):
            m = max(self.floor, m - self.step)
        return m

    def pseudo_enabled(self, epoch: int) -> bool:
        """Pseudo labels (and their BCE terms) are used from ``warmup_epochs`` on."""
        return pseudo_enabled(epoch, self.warmup_epochs)


@torch.no_grad()
def bank_thresholds(bank: torch.Tensor, filled: torch.Tensor, level: float) -> torch.Tensor:
    """Per-class cross-image thresholds (C,) calibrated on the memory bank (option
    ``pseudo.inter_threshold=calibrated``; the paper's fixed margin stays the default).

    Each filled entry of class c is scored like a query: the sum of its cosines to the class's
    other slots divided by K (empty slots count 0, as in the bank similarity). The threshold is
    the ``level`` quantile of those scores (``level`` = the scheduled margin), so "more similar
    than 95 % of the known positives" replaces "cosine >= 0.95". Why: the cosine scale depends on
    the trunk and the class; with a pretrained trunk true positives score 0.2-0.5, below every
    fixed margin (docs/accuracy.md). Classes with fewer than 2 entries get +inf (no labels).
    Device-only (no host read), identical on every rank (the bank is).
    """
    C, K, _ = bank.shape
    m = torch.nn.functional.normalize(bank.float(), dim=-1)  # empty (zero) slots stay zero
    cos = m @ m.transpose(1, 2)  # (C,K,K)
    own = (cos.sum(-1) - cos.diagonal(dim1=1, dim2=2)) / K
    n = filled.to(bank.device)
    valid = torch.arange(K, device=bank.device)[None, :] < n[:, None]  # the FIFO fills slots [0, filled)
    own = torch.where(valid, own, torch.full_like(own, float("nan")))
    t = torch.nanquantile(own, level, dim=1)
    return torch.where(n >= 2, t, torch.full_like(t, float("inf")))


@torch.no_grad()
def threshold_labels(sim: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Unknown entries whose similarity reaches their class's threshold become +1 (others unchanged)."""
    lift = (labels == 0) & (sim >= thresholds.to(sim.device)[None, :])
    return torch.where(lift, torch.ones_like(labels), labels)
