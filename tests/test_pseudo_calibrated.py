"""Option pseudo.inter_threshold=calibrated: per-class cross-image thresholds from the memory bank.

Why it exists (docs/accuracy.md): with a pretrained trunk the bank similarities of true
positives sit far below every fixed margin, so the paper's rule adds no pseudo label at all.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sst_dist.config import load_config
from sst_dist.pseudo import bank_thresholds, threshold_labels

DEBUG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "debug.yaml"


def _literal(bank: np.ndarray, filled: np.ndarray, level: float) -> np.ndarray:
    C, K, _ = bank.shape
    out = np.full(C, np.inf)
    for c in range(C):
        n = int(filled[c])
        if n < 2:
            continue
        unit = bank[c, :n] / np.linalg.norm(bank[c, :n], axis=1, keepdims=True)
        scores = [sum(unit[k] @ unit[j] for j in range(n) if j != k) / K for k in range(n)]
        out[c] = np.quantile(scores, level)
    return out


@pytest.mark.parametrize("level", [0.95, 0.8, 0.5])
def test_thresholds_are_quantiles_of_the_banks_own_similarities(level):
    g = torch.Generator().manual_seed(0)
    C, K, F = 4, 6, 5
    bank = torch.randn(C, K, F, generator=g) + 2.0 * torch.randn(C, 1, F, generator=g)
    filled = torch.tensor([6, 3, 1, 0])
    bank[torch.arange(K)[None, :] >= filled[:, None]] = 0.0  # the FIFO leaves unfilled slots zero
    got = bank_thresholds(bank, filled, level).numpy()
    want = _literal(bank.double().numpy(), filled.numpy(), level)
    assert np.isinf(got[2:]).all() and np.isfinite(got[:2]).all()
    np.testing.assert_allclose(got[:2], want[:2], rtol=1e-5, atol=1e-6)


def test_threshold_labels_only_lift_unknowns_at_their_class_threshold():
    sim = torch.tensor([[0.30, 0.30, 0.9], [0.10, 0.50, 0.9]])
    labels = torch.tensor([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    t = torch.tensor([0.25, 0.40, float("inf")])
    out = threshold_labels(sim, labels, t)
    assert out.tolist() == [[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]  # 0.30 < 0.40: class 1 stays


def test_trainer_stage_uses_the_option():
    """DistributedSST.pseudo_labels: the paper's margin adds nothing at a 0.3-0.6 cosine scale, the
    calibrated option lifts the unknowns that look like their class's bank and leaves the rest."""
    from sst_dist.model.sst import SSTModel
    from sst_dist.train.state import DistributedSST

    def stage(mode):
        cfg = load_config(DEBUG, [f"pseudo.inter_threshold={mode}", "model.impl=fused"])
        C, F = cfg.model.num_classes, cfg.model.out_dim
        model = SSTModel(cfg.model, torch.eye(C))
        g = torch.Generator().manual_seed(1)
        centre = torch.randn(C, 1, F, generator=g)
        K = model.bank.size
        model.bank.bank.copy_(centre + 1.2 * torch.randn(C, K, F, generator=g))  # cosines ~0.4
        model.bank.filled.fill_(K)
        sst = DistributedSST(cfg, model)
        sst.set_epoch(cfg.pseudo.warmup_epochs)
        feats = torch.randn(2, C, F, generator=g)
        feats[0] = centre[:, 0] + 0.3 * torch.randn(C, F, generator=g)  # image 0: like every class
        labels = torch.zeros(2, C)
        labels[:, 0] = -1.0  # a known negative stays negative
        out = SimpleNamespace(pair_logits=torch.full((2, C * (C - 1) // 2), -9.0), features=feats)
        pseudo, _, _ = sst.pseudo_labels(out, labels, None, cfg.pseudo.warmup_epochs)
        return pseudo["inter"]

    paper, calibrated = stage("margin"), stage("calibrated")
    assert (paper == torch.tensor(0.0)).sum() == paper.numel() - 2  # nothing lifted
    assert calibrated[0, 1:].eq(1).all() and calibrated[0, 0] == -1  # image 0: every unknown class
    assert calibrated[1].eq(1).sum() == 0  # a random feature: nothing


def test_similarity_weights_the_new_inter_positives_only():
    """pseudo.inter_weight=similarity: each lifted entry weighs its bank similarity in the inter
    term's weighted mean, every other known entry 1; the default ("hard") weighs nothing."""
    from sst_dist.model.sst import SSTModel
    from sst_dist.train.state import DistributedSST

    def stage(weight):
        cfg = load_config(DEBUG, ["pseudo.inter_threshold=calibrated", f"pseudo.inter_weight={weight}",
                                  "model.impl=fused"])
        C, F = cfg.model.num_classes, cfg.model.out_dim
        model = SSTModel(cfg.model, torch.eye(C))
        g = torch.Generator().manual_seed(1)
        centre = torch.randn(C, 1, F, generator=g)
        K = model.bank.size
        model.bank.bank.copy_(centre + 1.2 * torch.randn(C, K, F, generator=g))
        model.bank.filled.fill_(K)
        sst = DistributedSST(cfg, model)
        sst.set_epoch(cfg.pseudo.warmup_epochs)
        feats = torch.randn(2, C, F, generator=g)
        feats[0] = centre[:, 0] + 0.3 * torch.randn(C, F, generator=g)
        labels = torch.zeros(2, C)
        labels[:, 0] = -1.0
        labels[1, 1] = 1.0
        out = SimpleNamespace(pair_logits=torch.full((2, C * (C - 1) // 2), -9.0), features=feats,
                              logits=torch.randn(2, C, generator=g, dtype=torch.float64))
        pseudo, weights, _ = sst.pseudo_labels(out, labels, None, cfg.pseudo.warmup_epochs)
        return model, sst, out, labels, pseudo, weights

    *_, hard = stage("hard")
    assert hard == {}
    model, sst, out, labels, pseudo, weights = stage("similarity")
    inter, w = pseudo["inter"], weights["inter"]
    lifted = (labels == 0) & (inter == 1)
    assert lifted[0].sum() >= 3  # the test means something: several new positives
    sim = model.bank.similarity_reference(out.features)  # the literal cosines
    torch.testing.assert_close(w[lifted], sim[lifted].clamp(0, 1), rtol=1e-5, atol=1e-6)
    assert (w[lifted] < 0.99).all() and w[~lifted].eq(1).all()
    # the inter term is the weighted mean over known entries, by hand in float64
    term = sst.terms(out, labels, SimpleNamespace(features=out.features, labels=labels), pseudo, weights)
    x, ww = out.logits, w.double()
    per = torch.where(inter == 1, torch.nn.functional.softplus(-x), torch.nn.functional.softplus(x))
    known = inter != 0
    want = (per * ww)[known].sum() / ww[known].sum()
    assert term["inter"].value().item() == pytest.approx(want.item(), rel=1e-9)
