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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sst_dist import losses as L
from sst_dist.config import RunConfig
from sst_dist.pseudo import MarginSchedule, intra_pseudo_labels
from sst_dist.train import distributed as D

ROW_TERMS = ("bce", "intra", "inter", "cooc")
PSEUDO_STATS = ("intra_new", "intra_correct", "inter_new", "inter_correct", "unknown_pos")


@dataclass
class StepResult:
    """One micro-batch: the loss to backpropagate and global (all-rank) values for logging."""

    loss: torch.Tensor
    global_loss: float
    terms: dict[str, float]
    weights: dict[str, float]
    pseudo: dict[str, float]
    finite: bool


class DistributedSST:
    """Bank, margins, synchronized generator and the distributed SST loss for one run."""

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
        self.last_pseudo: dict[
            str, torch.Tensor | None
        ] = {}  # this rank's latest pseudo labels (tests, logs)

    @property
    def bank(self) -> Any:
        return self.model.bank

    def set_epoch(self, epoch: int) -> None:
        m = self.schedule.margin(epoch)
        self.margins = {"intra": m, "inter": m}

    def compute(
        self, out: Any, labels: torch.Tensor, full: torch.Tensor | None, epoch: int, progress: float
    ) -> StepResult:
        """Update the bank, make pseudo labels, and build this rank's share of the global loss."""
        impl = getattr(self.model, "impl", "fused")
        logits, pair_logits, feats = out.logits, out.pair_logits, out.features
        finite = torch.stack([torch.isfinite(t).all() for t in (logits, pair_logits, feats)]).all()
        bad = D.all_reduce_sum((~finite).float().reshape(1))
        if float(bad.item()) > 0:
            zero = logits.sum() * 0.0
            return StepResult(zero, float("nan"), {}, {}, {}, False)

        g_feats = D.all_gather_rows(feats, keep_local_grad=True)
        g_labels = D.all_gather_rows(labels, keep_local_grad=False)
        self.bank.update(g_feats.detach().float(), g_labels, impl=impl)

        pseudo_on = self.schedule.pseudo_enabled(epoch)
        intra_lab = inter_lab = None
        stats = torch.zeros(len(PSEUDO_STATS), dtype=torch.float64)
        if pseudo_on:
            intra_lab = intra_pseudo_labels(pair_logits.detach(), labels, self.margins["intra"])
            _, inter_lab = self.bank.pseudo_labels(
                feats.detach().float(), labels, self.margins["inter"], impl=impl
            )
            if full is not None:
                stats = self._pseudo_stats(labels, intra_lab, inter_lab, full)
        self.last_pseudo = {"intra": intra_lab, "inter": inter_lab}

        terms = {
            "bce": L.partial_bce(logits, labels),
            "cooc": L.cooccurrence_asl(pair_logits, labels, known_only=self.cfg.loss.pair_targets == "known"),
        }
        if pseudo_on:
            terms["intra"] = L.partial_bce(logits, intra_lab)
            terms["inter"] = L.partial_bce(logits, inter_lab)
        contrast = L.contrastive(g_feats, g_labels, generator=self.generator, impl=impl)

        rows = [k for k in ROW_TERMS if k in terms]
        local = torch.stack(
            [terms[k].numerator.detach().double() for k in rows]
            + [terms[k].denominator.detach().double() for k in rows]
        )
        red = D.all_reduce_sum(torch.cat([local, stats.to(local.device)]))
        nums, dens, stats = red[: len(rows)], red[len(rows) : 2 * len(rows)], red[2 * len(rows) :]
        weights = self.weights.effective(epoch, progress)
        world = D.world_size()
        loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        values: dict[str, float] = {}
        for k, num, den in zip(rows, nums, dens):
            g_den = den.clamp_min(1.0)
            loss = loss + weights[k] * terms[k].numerator / g_den.to(terms[k].numerator.dtype)
            values[k] = float(num / g_den)
        loss = loss + weights["contrastive"] * contrast.value()
        values["contrastive"] = float(contrast.value().detach())
        loss = loss * world
        total = sum(weights.get(k, 0.0) * v for k, v in values.items())
        pseudo = {k: float(v) for k, v in zip(PSEUDO_STATS, stats.tolist())}
        ok = all(torch.isfinite(torch.tensor(v)) for v in values.values())
        return StepResult(loss, float(total), values, weights, pseudo, bool(ok))

    @staticmethod
    @torch.no_grad()
    def _pseudo_stats(
        labels: torch.Tensor, intra: torch.Tensor, inter: torch.Tensor, full: torch.Tensor
    ) -> torch.Tensor:
        """Counts: new pseudo positives and how many are truly positive, and unknown positives."""
        unknown = labels == 0
        truth = full.to(labels.device) == 1
        new_intra = unknown & (intra == 1)
        new_inter = unknown & (inter == 1)
        return (
            torch.stack(
                [
                    new_intra.sum(),
                    (new_intra & truth).sum(),
                    new_inter.sum(),
                    (new_inter & truth).sum(),
                    (unknown & truth).sum(),
                ]
            )
            .double()
            .cpu()
        )

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
