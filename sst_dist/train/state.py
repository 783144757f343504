"""SST's training state across ranks, and the world-size-invariant loss.

What makes N ranks x batch b train exactly like 1 rank x batch N*b:

- Memory bank: every rank all-gathers the batch's features and labels in global batch order
  (rank order) and pushes the same positives into its bank, so the bank is identical on all
  ranks and equal to the single-process bank.
- Contrastive term: computed over the all-gathered global batch (only this rank's rows keep
  their gradient) with a ``torch.Generator`` seeded identically on every rank; every call draws
  the same number of uniforms, so the random negative subsets agree across ranks.
- Per-row terms (BCE, intra/inter BCE, co-occurrence): local numerator divided by the
  all-reduced global denominator; the global contrastive term's own numerator/denominator are
  already global. The sum over ranks of the local gradients is then the global-batch gradient;
  the loss is multiplied by ``world_size`` because DeepSpeed averages gradients over ranks.
- Margins and warm-up follow :class:`sst_dist.pseudo.MarginSchedule` by epoch.

The step runs as the named stages of :mod:`.sst_stages` (the profiler times each by name) and
never reads a device value on the host: a non-finite step is agreed on the device (``ok``), the
bank ignores it and the trainer's optimizer skips it there.
"""

from __future__ import annotations

from typing import Any

import torch

from sst_dist import losses as L
from sst_dist.config import RunConfig
from sst_dist.pseudo import MarginSchedule, bank_thresholds, intra_pseudo_labels, threshold_labels
from sst_dist.train import distributed as D
from sst_dist.train.sst_stages import (  # noqa: F401  (re-exported: StepResult, PSEUDO_STATS)
    PSEUDO_STATS,
    ROW_TERMS,
    STAGES,
    Gathered,
    StepResult,
    gather,
    pseudo_stats,
)


class DistributedSST:
    """Bank, margins, synchronized generator and the distributed SST loss for one run."""

    stages = STAGES

    def __init__(self, cfg: RunConfig, model: torch.nn.Module) -> None:
        self.cfg, self.model = cfg, model
        p = cfg.pseudo
        self.schedule = MarginSchedule(
            start=p.margin_start, floor=p.margin_min, step=p.margin_step, warmup_epochs=p.warmup_epochs
        )
        self.weights = L.LossWeights(cfg.loss, p.warmup_epochs)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(cfg.train.seed) * 1000003 + 17)
        if D.world_size() > 1:  # same seed everywhere already; rank 0's state makes it certain
            self.generator.set_state(D.broadcast_object(self.generator.get_state()))
        self.margins = {"intra": p.margin_start, "inter": p.margin_start}
        # this rank's latest pseudo labels (tests, logs)
        self.last_pseudo: dict[str, torch.Tensor | None] = {}

    @property
    def bank(self) -> Any:
        return self.model.bank

    @property
    def impl(self) -> str:
        return getattr(self.model, "impl", "fused")

    def set_epoch(self, epoch: int) -> None:
        m = self.schedule.margin(epoch)
        self.margins = {"intra": m, "inter": m}

    # ------------------------------------------------------------------ the stages
    def gather(self, out: Any, labels: torch.Tensor) -> Gathered:
        return gather(out, labels, self.cfg.train.batch_size)

    def update_bank(self, g: Gathered) -> torch.Tensor:
        return self.bank.update(g.features.detach().float(), g.labels, impl=self.impl, enabled=g.finite)

    def pseudo_labels(
        self, out: Any, labels: torch.Tensor, full: torch.Tensor | None, epoch: int
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor], torch.Tensor]:
        """Intra and inter completed labels (None before warm-up ends), the weights of their
        entries where an option asks for any (else empty), and their counts."""
        if not self.schedule.pseudo_enabled(epoch):
            self.last_pseudo = {"intra": None, "inter": None}
            return None, {}, pseudo_stats(labels, labels, labels, None)
        intra = intra_pseudo_labels(out.pair_logits.detach(), labels, self.margins["intra"])
        feats = out.features.detach().float()
        p = self.cfg.pseudo
        if p.inter_threshold == "calibrated":  # option: per-class thresholds from the bank
            sim, _ = self.bank.pseudo_labels(feats, labels, 2.0, impl=self.impl)  # cosines < 2: sim only
            t = bank_thresholds(self.bank.bank, self.bank.filled, self.margins["inter"])
            inter = threshold_labels(sim, labels, t)
        else:
            sim, inter = self.bank.pseudo_labels(feats, labels, self.margins["inter"], impl=self.impl)
        weights = {}
        if p.inter_weight == "similarity":  # option: a new positive counts by its bank similarity
            lifted = (labels == 0) & (inter == 1)
            weights["inter"] = torch.where(lifted, sim.clamp(0.0, 1.0), torch.ones_like(sim))
        self.last_pseudo = {"intra": intra, "inter": inter}
        return {"intra": intra, "inter": inter}, weights, pseudo_stats(labels, intra, inter, full)

    def terms(
        self,
        out: Any,
        labels: torch.Tensor,
        g: Gathered,
        pseudo: dict[str, torch.Tensor] | None,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, L.Term]:
        return L.sst_terms(
            out.logits, out.pair_logits, labels, pseudo, g.features, g.labels,
            self.generator, self.impl, self.cfg.loss.pair_targets, weights,
        )

    def reduce(
        self,
        terms: dict[str, L.Term],
        stats: torch.Tensor,
        finite: torch.Tensor,
        epoch: int,
        progress: float,
        stop: bool = False,
    ) -> StepResult:
        """One all-reduce of row numerators, denominators, pseudo counts and the stop flag."""
        rows = [k for k in ROW_TERMS if k in terms]
        dev = terms["bce"].numerator.device
        flag = torch.full((1,), 1.0 if stop else 0.0, dtype=torch.float64, device=dev)
        local = torch.cat(
            [torch.stack([terms[k].numerator.detach().double() for k in rows]),
             torch.stack([terms[k].denominator.detach().double() for k in rows]),
             stats.to(dev), flag]
        )
        red = D.all_reduce_sum(local)
        n = len(rows)
        nums, dens = red[:n], red[n : 2 * n]
        weights = self.weights.effective(epoch, progress)
        loss = L.total_loss(terms, weights, dict(zip(rows, dens))) * D.world_size()
        contrast = terms["contrastive"].value().detach().double().reshape(1)
        values = torch.cat([nums / dens.clamp_min(1.0), contrast])
        names = (*rows, "contrastive")
        total = sum((weights.get(k, 0.0) * values[i] for i, k in enumerate(names)), values.new_zeros(()))
        ok = finite & torch.isfinite(values).all()
        report = torch.cat([total.reshape(1), values, red[2 * n :]])
        return StepResult(loss, ok, report, names, weights)

    # ------------------------------------------------------------------ the step
    def compute(
        self,
        out: Any,
        labels: torch.Tensor,
        full: torch.Tensor | None,
        epoch: int,
        progress: float,
        stop: bool = False,
    ) -> StepResult:
        """Update the bank, make pseudo labels, and build this rank's share of the global loss."""
        g = self.gather(out, labels)
        self.update_bank(g)
        pseudo, weights, stats = self.pseudo_labels(out, labels, full, epoch)
        terms = self.terms(out, labels, g, pseudo, weights)
        return self.reduce(terms, stats, g.finite, epoch, progress, stop)

    def state_dict(self) -> dict[str, Any]:
        return {
            "bank": {k: v.detach().cpu().clone() for k, v in self.bank.state_dict().items()},
            "margins": dict(self.margins),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        self.margins = dict(state["margins"])
        self.generator.set_state(state["generator"])


def pseudo_quality(stats: dict[str, float]) -> dict[str, float]:
    """Precision/recall of the new pseudo positives against the full labels (summed counts)."""
    out: dict[str, float] = {}
    for name in ("intra", "inter"):
        new, correct = stats.get(f"{name}_new", 0.0), stats.get(f"{name}_correct", 0.0)
        out[f"{name}_count"] = new
        out[f"{name}_precision"] = correct / new if new else 0.0
        out[f"{name}_recall"] = correct / stats["unknown_pos"] if stats.get("unknown_pos") else 0.0
    return out
