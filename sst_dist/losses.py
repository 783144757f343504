"""SST's five loss terms, each as a (numerator, denominator) pair.

Every term is a mean of per-entry losses; it is returned as Term(sum of kept losses, number of kept
entries) so the single-process loss is numerator / denominator, and a distributed trainer can
all-reduce the denominators and divide the local numerators by the global count: the sum of the
per-rank gradients then equals the gradient of the global-batch mean (world-size invariance).
A term with no entries (e.g. no known label, batch of one image for the contrastive term) has
numerator 0 and denominator 0; ``Term.value`` and ``total_loss`` divide by max(denominator, 1),
so it contributes 0 (the reference would give NaN there). Denominators carry no gradient.

Semantics follow the reference (loss/SST.py, SST.py); see each function for the details.

There is one loss path: :func:`sst_terms` builds the terms and :func:`total_loss` weighs them.
Training (:class:`sst_dist.train.state.DistributedSST`) calls both with the gathered global batch
for the contrastive term and the all-reduced denominators; the single-process entry
:func:`sst_loss_terms`, the tests and the benchmarks call the same two functions. Label values
are validated once where the batch is made (:func:`sst_dist.pseudo.check_labels`); the terms
check shapes only, so a training step never reads a device tensor on the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as Fn

from kernels import dispatch
from kernels.torch_similarity import EPS
from sst_dist.config import LossConfig
from sst_dist.pseudo import check_labels, num_pairs, pseudo_enabled

IMPLS = ("reference", "fused", "triton")
TERMS = ("bce", "intra", "inter", "cooc", "contrastive")


class Term(NamedTuple):
    """A mean-type loss as numerator (differentiable sum) and denominator (entry count, no grad)."""

    numerator: torch.Tensor
    denominator: torch.Tensor

    def value(self) -> torch.Tensor:
        """numerator / max(denominator, 1): the single-process loss."""
        return self.numerator / self.denominator.clamp_min(1.0)


def _count(mask_or_n: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(mask_or_n, torch.Tensor):
        return mask_or_n.detach().to(like.dtype).sum()
    return torch.tensor(float(mask_or_n), dtype=like.dtype, device=like.device)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def partial_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> Term:
    """Mean binary cross-entropy over known entries only (+1 -> softplus(-x), -1 -> softplus(x)).

    ``weights`` (same shape, >= 0, no gradient) makes it the weighted mean over known entries
    (option ``pseudo.inter_weight=similarity``); None is weight 1 everywhere."""
    if logits.shape != labels.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} != labels shape {tuple(labels.shape)}")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != labels shape {tuple(labels.shape)}")
    x = _float(logits)
    pos, neg = labels == 1, labels == -1
    loss = torch.where(pos, Fn.softplus(-x), torch.zeros_like(x)) + torch.where(
        neg, Fn.softplus(x), torch.zeros_like(x)
    )
    if weights is None:
        return Term(loss.sum(), _count(pos | neg, x))
    w = torch.where(pos | neg, weights.detach().to(x.dtype), torch.zeros_like(x))
    return Term((loss * w).sum(), w.sum())


def pair_targets(labels: torch.Tensor) -> torch.Tensor:
    """t (B,P) = [y_i = +1][y_j = +1] over pairs i<j in row-major order (unknown counts as 0)."""
    C = labels.shape[1]
    i, j = torch.triu_indices(C, C, 1, device=labels.device)
    pos = labels == 1
    return pos[:, i] & pos[:, j]


def pair_target_known(labels: torch.Tensor) -> torch.Tensor:
    """(B,P): whether t_p is known: both labels known, or either one a known negative."""
    C = labels.shape[1]
    i, j = torch.triu_indices(C, C, 1, device=labels.device)
    known, neg = labels != 0, labels == -1
    return (known[:, i] & known[:, j]) | neg[:, i] | neg[:, j]


def cooccurrence_asl(
    pair_logits: torch.Tensor,
    labels: torch.Tensor,
    gamma_neg: float = 2.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    known_only: bool = False,
) -> Term:
    """Asymmetric loss of the pair head against t_p, mean over all B*P entries.

    ``known_only`` (not the reference; ``loss.pair_targets=known``) averages over the entries whose
    target is known instead (:func:`pair_target_known`), so unknown labels do not teach the head
    that pairs rarely co-occur; docs/accuracy.md shows why that matters at low proportions.

    As the reference's intraAsymmetricLoss: with p = sigmoid(q), positives cost
    -log(max(p, eps)) (1-p)^gamma_pos; negatives use the shifted probability
    pn = min(1 - p + clip, 1) both inside the log and in the focusing weight:
    -log(max(pn, eps)) (1-pn)^gamma_neg (so negatives with p <= clip cost exactly 0).
    Only the target is detached (built from labels); the focusing weights keep their gradient.
    log p is evaluated as logsigmoid for stability (same value and gradient as the clamp form).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B,C), got shape {tuple(labels.shape)}")
    B, C = labels.shape
    if pair_logits.dim() != 2 or tuple(pair_logits.shape) != (B, num_pairs(C)):
        raise ValueError(
            f"pair_logits must be (B, C(C-1)/2) = ({B}, {num_pairs(C)}), got {tuple(pair_logits.shape)}"
        )
    x = _float(pair_logits)
    t = pair_targets(labels)
    p = torch.sigmoid(x)
    log_p = Fn.logsigmoid(x).clamp_min(math.log(eps))
    loss_pos = -log_p * (1.0 - p).pow(gamma_pos)
    pn = (torch.sigmoid(-x) + clip).clamp(max=1.0) if clip and clip > 0 else torch.sigmoid(-x)
    loss_neg = -torch.log(pn.clamp(min=eps)) * (1.0 - pn).pow(gamma_neg)
    loss = torch.where(t, loss_pos, loss_neg)
    if known_only:
        keep = pair_target_known(labels)
        return Term(torch.where(keep, loss, torch.zeros_like(loss)).sum(), _count(keep, x))
    return Term(loss.sum(), _count(t.numel(), x))


def _pair_cosines(features: torch.Tensor, impl: str) -> torch.Tensor:
    """cos (C, B(B-1)/2): per class, cosine of every image pair i<j (row-major upper triangle)."""
    B = features.shape[0]
    i, j = torch.triu_indices(B, B, 1, device=features.device)
    if impl == "reference":
        a, b = features[i], features[j]  # (Pb,C,F)
        dots = (a * b).sum(-1)
        den = a.norm(dim=-1).clamp_min(EPS) * b.norm(dim=-1).clamp_min(EPS)
        return (dots / den).transpose(0, 1)
    gram = dispatch.class_cosine_gram(features, backend="triton" if impl == "triton" else "torch")
    return gram[:, i, j]


def _rank_desc(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rank (0 = largest) of each masked entry among the masked entries; unmasked rank last."""
    flat = torch.where(mask, values, torch.full_like(values, -math.inf)).flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank.view_as(values)


def _selection_weight(
    terms: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, n_pos: torch.Tensor
) -> torch.Tensor:
    """How often each entry of one negative kind is kept: 2n random + n hardest (may overlap).

    With n_pos == 0 every masked entry is kept once. Selection is a mask-and-rank, so it needs no
    host synchronization and no loop over classes.
    """
    random_keep = mask & (_rank_desc(keys, mask) < 2 * n_pos)
    hard_keep = mask & (_rank_desc(terms, mask) < n_pos)
    w = random_keep.to(terms.dtype) + hard_keep.to(terms.dtype)
    return torch.where(n_pos > 0, w, mask.to(terms.dtype))


def contrastive(
    features: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    impl: str = "fused",
) -> Term:
    """Cross-image contrastive term over unordered image pairs i<j of the batch, for every class.

    For (pair, class) entries: both +1 -> 1 - cos; one +1 and one -1 -> 1 + cos; both -1 -> 1 + cos;
    any unknown -> not used. As in the reference, the selection pools all classes: with n the total
    number of positive (pair, class) entries over all classes, each negative kind keeps a uniform
    random subset of min(2n, count) entries plus its min(n, count) largest terms (an entry in both
    counts twice); with n = 0 all entries are kept. Mean over the kept entries.

    Randomness: every call draws exactly C * B(B-1)/2 uniforms from ``generator`` (the global RNG
    when None), whatever the labels, so ranks sharing a generator seed stay in step. The keys are
    laid out (class, pair) and shared by both negative kinds (their entries are disjoint).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if features.dim() != 3:
        raise ValueError(f"features must be (B,C,F), got shape {tuple(features.shape)}")
    if tuple(labels.shape) != tuple(features.shape[:2]):
        raise ValueError(f"labels shape {tuple(labels.shape)} != features (B,C) {tuple(features.shape[:2])}")
    f = _float(features)
    B, C = labels.shape
    cos = _pair_cosines(f, impl)  # (C,Pb)
    i, j = torch.triu_indices(B, B, 1, device=labels.device)
    y = labels.transpose(0, 1)
    yi, yj = y[:, i], y[:, j]
    pp = (yi == 1) & (yj == 1)
    pn = ((yi == 1) & (yj == -1)) | ((yi == -1) & (yj == 1))
    nn_ = (yi == -1) & (yj == -1)
    term = torch.where(pp, 1.0 - cos, 1.0 + cos)
    gen_device = generator.device if generator is not None else f.device
    keys = torch.rand(cos.shape, generator=generator, device=gen_device, dtype=torch.float64)
    keys = keys.to(f.device)
    n_pos = pp.sum()
    det = term.detach()
    w = pp.to(f.dtype) + _selection_weight(det, keys, pn, n_pos) + _selection_weight(det, keys, nn_, n_pos)
    return Term((term * w).sum(), w.sum())


@dataclass
class LossWeights:
    """The run config's loss weights (``LossConfig``, YAML section ``loss``) and the schedule that
    turns terms on.

    The pseudo-label BCE terms (intra, inter) count only from ``warmup_epochs`` on; during the
    first ``loss.ramp_epochs`` (1, as the reference) the co-occurrence and contrastive terms ramp
    linearly with the fraction of training done (the reference multiplies by
    batchIndex / len(loader) in epoch 0, so the first step has weight 0); 0 disables the ramp.
    """

    loss: LossConfig = field(default_factory=LossConfig)
    warmup_epochs: int = 5

    def effective(self, epoch: int, progress: float = 1.0) -> dict[str, float]:
        """Weights in force at ``epoch`` with ``progress`` (fraction of epoch 0 done, in [0,1])."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        w, n = self.loss, self.loss.ramp_epochs
        ramp = min(1.0, (epoch + progress) / n) if 0 < n and epoch < n else 1.0
        pseudo = pseudo_enabled(epoch, self.warmup_epochs)
        return {
            "bce": w.bce,
            "intra": w.intra_bce if pseudo else 0.0,
            "inter": w.inter_bce if pseudo else 0.0,
            "cooc": w.cooccurrence * ramp,
            "contrastive": w.contrastive * ramp,
        }


def sst_terms(
    logits: torch.Tensor,
    pair_logits: torch.Tensor,
    labels: torch.Tensor,
    pseudo: Mapping[str, torch.Tensor] | None,
    contrast_features: torch.Tensor,
    contrast_labels: torch.Tensor,
    generator: torch.Generator | None = None,
    impl: str = "fused",
    pair_targets: str = "reference",
    pseudo_weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Term]:
    """The SST terms of one batch: the one place they are assembled.

    Row terms (bce, cooc, and intra/inter when ``pseudo`` holds those completed labels) come from
    this process's rows; the contrastive term from ``contrast_features``/``contrast_labels``,
    which are the local batch in one process and the all-gathered global batch in training.
    ``pair_targets`` is ``loss.pair_targets``: the co-occurrence term averages over all B*P pairs
    ("reference") or over the pairs whose target is known ("known", :func:`cooccurrence_asl`).
    ``pseudo_weights`` optionally weights a pseudo-label term's entries (:func:`partial_bce`).
    """
    if pair_targets not in ("reference", "known"):
        raise ValueError(f"pair_targets must be 'reference' or 'known', got {pair_targets!r}")
    terms = {
        "bce": partial_bce(logits, labels),
        "cooc": cooccurrence_asl(pair_logits, labels, known_only=pair_targets == "known"),
    }
    for name, lab in (pseudo or {}).items():
        if name not in ("intra", "inter"):
            raise KeyError(f"pseudo labels must be 'intra' or 'inter', got {name!r}")
        terms[name] = partial_bce(logits, lab, (pseudo_weights or {}).get(name))
    terms["contrastive"] = contrastive(contrast_features, contrast_labels, generator=generator, impl=impl)
    return terms


def sst_loss_terms(
    out_logits: torch.Tensor,
    pair_logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    intra_labels: torch.Tensor | None,
    inter_labels: torch.Tensor | None,
    epoch: int,
    progress: float,
    cfg: LossWeights,
    generator: torch.Generator | None = None,
    impl: str = "fused",
) -> dict[str, Term]:
    """All SST terms for one batch in one process (validates ``labels`` once, then :func:`sst_terms`).

    Returns keys bce, cooc, contrastive, plus intra and inter when pseudo labels are on (epoch >=
    ``cfg.warmup_epochs``; they need the completed labels then, passing None is an error).
    ``cfg.loss.pair_targets`` applies as in training. Combine with
    ``total_loss(terms, cfg.effective(epoch, progress))``.
    """
    cfg.effective(epoch, progress)  # validates epoch/progress
    check_labels(labels, "labels")
    pseudo = None
    if pseudo_enabled(epoch, cfg.warmup_epochs):
        pseudo = {}
        for name, lab in (("intra", intra_labels), ("inter", inter_labels)):
            if lab is None:
                raise ValueError(
                    f"{name}_labels is required from epoch {cfg.warmup_epochs} on (got None at epoch {epoch})"
                )
            check_labels(lab, f"{name}_labels")
            pseudo[name] = lab
    return sst_terms(
        out_logits, pair_logits, labels, pseudo, features, labels, generator, impl, cfg.loss.pair_targets
    )


def total_loss(
    terms: Mapping[str, Term],
    weights: Mapping[str, float],
    denominators: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """sum_k weights[k] * numerator_k / max(denominator_k, 1) over the given terms.

    ``weights`` is usually ``LossWeights.effective(epoch, progress)``; a term missing from it has
    weight 0. Zero-weight terms are still multiplied in (as the reference's ``0 * loss``) so every
    head stays in the autograd graph (no "unused parameter" surprises in data-parallel wrappers).
    A distributed trainer passes the all-reduced global ``denominators`` of the terms it reduced
    (a term not in the mapping keeps its own, e.g. the contrastive term of a gathered batch) and
    multiplies by world size if its gradient reduction averages instead of sums.
    """
    unknown = set(terms) - set(TERMS)
    if unknown:
        raise KeyError(f"unknown loss terms {sorted(unknown)}; expected a subset of {TERMS}")
    if not terms:
        raise ValueError("total_loss needs at least one term")
    parts = []
    for name, term in terms.items():
        den = term.denominator if denominators is None else denominators.get(name, term.denominator)
        den = den.to(device=term.numerator.device, dtype=term.numerator.dtype).clamp_min(1.0)
        parts.append(float(weights.get(name, 0.0)) * term.numerator / den)
    return torch.stack(parts).sum()
