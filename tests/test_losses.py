"""SST loss terms: hand-worked values, slow loop references, fused vs reference values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from sst_dist.config import LossConfig
from sst_dist.losses import (
    LossWeights,
    Term,
    cooccurrence_asl,
    partial_bce,
    sst_loss_terms,
    total_loss,
)

SHAPES = [(B, C) for B in (1, 3, 8) for C in (3, 7, 20, 80)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def rand_labels(B: int, C: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-1, 2, (B, C), generator=gen).double()


# ---------------------------------------------------------------- partial BCE


def test_partial_bce_hand_worked() -> None:
    # +1 at logit 0: -log(1/2) = ln2; -1 at logit ln3: -log(1 - 3/4) = ln4; unknown ignored.
    logits = torch.tensor([[0.0, math.log(3.0), 5.0]], dtype=torch.float64)
    t = partial_bce(logits, torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64))
    assert t.denominator.item() == 2
    assert t.value().item() == pytest.approx(1.5 * math.log(2.0), rel=1e-12)


def test_partial_bce_weighted_hand_worked() -> None:
    """pseudo.inter_weight=similarity: a weighted mean over known entries, gradient w*(p - y)/sum(w)."""
    # +1 at logit 0 with weight 1/4: ln2 / 4; -1 at logit ln3 with weight 1: ln4; unknown (weight 9)
    # ignored. Mean = (ln2/4 + 2 ln2) / (1/4 + 1) = 1.8 ln2.
    logits = torch.tensor([[0.0, math.log(3.0), 5.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[0.25, 1.0, 9.0]], dtype=torch.float64)
    t = partial_bce(logits, labels, w)
    assert t.denominator.item() == pytest.approx(1.25, rel=1e-12)
    assert t.value().item() == pytest.approx(1.8 * math.log(2.0), rel=1e-12)
    t.value().backward()
    # d/dx softplus(-x) = p - 1 = -1/2 at 0; d/dx softplus(x) = p = 3/4 at ln3
    want = torch.tensor([[0.25 * -0.5, 1.0 * 0.75, 0.0]], dtype=torch.float64) / 1.25
    torch.testing.assert_close(logits.grad, want, rtol=1e-12, atol=1e-15)
    # weight 1 everywhere is the unweighted term, numerator and denominator alike
    plain = partial_bce(logits.detach(), labels)
    ones = partial_bce(logits.detach(), labels, torch.ones_like(labels))
    assert torch.equal(plain.numerator, ones.numerator) and torch.equal(plain.denominator, ones.denominator)
    with pytest.raises(ValueError, match="weights shape"):
        partial_bce(logits, labels, torch.ones(1, 2, dtype=torch.float64))


def test_partial_bce_stable_and_empty() -> None:
    logits = torch.tensor([[1000.0, -1000.0]], requires_grad=True)
    t = partial_bce(logits, torch.tensor([[-1.0, 1.0]]))
    assert t.value().item() == pytest.approx(1000.0)
    t.value().backward()
    assert torch.isfinite(logits.grad).all()
    empty = partial_bce(torch.randn(2, 3), torch.zeros(2, 3))
    assert empty.numerator.item() == 0 and empty.denominator.item() == 0 and empty.value().item() == 0


@pytest.mark.parametrize("B,C", SHAPES)
def test_partial_bce_vs_torch_loop(B: int, C: int) -> None:
    gen = torch.Generator().manual_seed(B + 10 * C)
    x = 3 * torch.randn(B, C, generator=gen, dtype=torch.float64)
    y = rand_labels(B, C, gen)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = partial_bce(x1, y).value()
    losses = [
        torch.nn.functional.binary_cross_entropy_with_logits(x2[b, c], (y[b, c] > 0).double())
        for b in range(B)
        for c in range(C)
        if y[b, c] != 0
    ]
    want = torch.stack(losses).mean() if losses else x2.sum() * 0
    assert rel_err(got, want) <= 1e-12
    got.backward()
    want.backward()
    assert rel_err(x1.grad, x2.grad) <= 1e-10


# ---------------------------------------------------------------- co-occurrence ASL


def literal_asl(q: torch.Tensor, labels: torch.Tensor, clip=0.05, eps=1e-8, gn=2.0, gp=1.0) -> torch.Tensor:
    """Pair by pair, with the probability-space clamps and logs of the reference formula."""
    B, C = labels.shape
    losses = []
    for b in range(B):
        p = 0
        for i in range(C):
            for j in range(i + 1, C):
                t = 1.0 if labels[b, i] == 1 and labels[b, j] == 1 else 0.0
                s = torch.sigmoid(q[b, p])
                sn = torch.clamp(1 - s + clip, max=1)
                loss = -(t * torch.log(s.clamp(min=eps)) + (1 - t) * torch.log(sn.clamp(min=eps)))
                prob = s * t + sn * (1 - t)
                losses.append(loss * torch.pow(1 - prob, gp * t + gn * (1 - t)))
                p += 1
    return torch.stack(losses).mean()


def test_cooc_hand_worked() -> None:
    # C=3, pairs (0,1) (0,2) (1,2); labels [1, 1, 0] -> targets [1, 0, 0]. All logits 0 (p = 1/2):
    # target 1: -ln(1/2) * (1/2)^1 = ln2/2; target 0: pn = 0.55, -ln(0.55) * 0.45^2 each.
    q = torch.zeros(1, 3, dtype=torch.float64)
    t = cooccurrence_asl(q, torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64))
    want = (math.log(2) / 2 + 2 * (-math.log(0.55) * 0.45**2)) / 3
    assert t.denominator.item() == 3 and t.value().item() == pytest.approx(want, rel=1e-12)
    # A negative with p <= clip costs exactly 0 (pn clamps to 1) and gets no gradient.
    q = torch.tensor([[-4.0, -4.0, -4.0]], dtype=torch.float64, requires_grad=True)  # p = 0.018
    t = cooccurrence_asl(q, torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64))
    assert t.numerator.item() == 0.0
    t.numerator.backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_cooc_known_pairs_only_hand_worked() -> None:
    # labels [1, 0, -1]: pair (0,1) has an unknown target; (0,2) and (1,2) are known 0 (a known
    # negative decides them). Logits 0: each known pair costs -ln(0.55) * 0.45^2, mean over 2;
    # the unknown pair gets no gradient.
    q = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    t = cooccurrence_asl(q, torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64), known_only=True)
    assert t.denominator.item() == 2
    assert t.value().item() == pytest.approx(-math.log(0.55) * 0.45**2, rel=1e-12)
    t.value().backward()
    assert q.grad[0, 0].item() == 0.0 and (q.grad[0, 1:] != 0).all()
    # labels [1, 1, 0]: only (0,1) is known (target 1); the reference form averages over all 3.
    t = cooccurrence_asl(torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]]), known_only=True)
    assert t.denominator.item() == 1 and t.value().item() == pytest.approx(math.log(2) / 2, rel=1e-6)


@pytest.mark.parametrize("B,C", [(1, 3), (3, 7), (8, 7), (3, 20)])
def test_cooc_vs_literal(B: int, C: int) -> None:
    gen = torch.Generator().manual_seed(B * 7 + C)
    P = C * (C - 1) // 2
    q = 3 * torch.randn(B, P, generator=gen, dtype=torch.float64)
    labels = torch.where(torch.rand(B, C, generator=gen) < 0.5, 1.0, -1.0).double()
    labels[0, 0] = 0.0
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    got, want = cooccurrence_asl(q1, labels).value(), literal_asl(q2, labels)
    assert rel_err(got, want) <= 1e-12
    got.backward()
    want.backward()
    assert rel_err(q1.grad, q2.grad) <= 1e-10


def prob_space_asl(q: torch.Tensor, labels: torch.Tensor, clip=0.05, eps=1e-8) -> torch.Tensor:
    """The reference formula vectorized in probability space, targets from a pair index loop."""
    C = labels.shape[1]
    ii = [i for i in range(C) for _ in range(i + 1, C)]
    jj = [j for i in range(C) for j in range(i + 1, C)]
    t = ((labels[:, ii] > 0) & (labels[:, jj] > 0)).to(q.dtype)
    s = torch.sigmoid(q)
    sn = (1 - s + clip).clamp(max=1)
    loss = -(t * torch.log(s.clamp(min=eps)) + (1 - t) * torch.log(sn.clamp(min=eps)))
    prob = s * t + sn * (1 - t)
    return (loss * torch.pow(1 - prob, 1.0 * t + 2.0 * (1 - t))).mean()


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cooc_and_bce_all_shapes(B: int, C: int, dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(B * 5 + C)
    q = (2 * torch.randn(B, C * (C - 1) // 2, generator=gen, dtype=torch.float64)).to(dtype)
    x = (2 * torch.randn(B, C, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.where(torch.rand(B, C, generator=gen) < 0.6, 1.0, -1.0).to(dtype)
    labels[:, 0] = 0.0
    q1, q2 = q.clone().requires_grad_(), q.clone().double().requires_grad_()
    got, want = cooccurrence_asl(q1, labels).value(), prob_space_asl(q2, labels.double())
    got.backward()
    want.backward()
    assert got.dtype == dtype
    assert rel_err(got.double(), want) <= tol and rel_err(q1.grad.double(), q2.grad) <= tol
    x1, x2 = x.clone().requires_grad_(), x.clone().double().requires_grad_()
    known = labels != 0
    got = partial_bce(x1, labels).value()
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        x2[known], (labels[known] > 0).double()
    ) if known.any() else x2.sum() * 0
    got.backward()
    want.backward()
    assert rel_err(got.double(), want) <= tol and rel_err(x1.grad.double(), x2.grad) <= tol


def test_cooc_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"pair_logits.*\(2, 3\)"):
        cooccurrence_asl(torch.zeros(2, 4), torch.zeros(2, 3))


# ---------------------------------------------------------------- combiner


def test_effective_weights_schedule() -> None:
    cfg = LossWeights()
    w = cfg.effective(0, 0.5)
    assert w == {"bce": 1.0, "intra": 0.0, "inter": 0.0, "cooc": 5.0, "contrastive": 0.025}
    assert cfg.effective(0, 0.0)["cooc"] == 0.0
    full = {"bce": 1.0, "intra": 0.0, "inter": 0.0, "cooc": 10.0, "contrastive": 0.05}
    assert cfg.effective(1, 0.0) == full
    assert cfg.effective(5)["intra"] == 1.0 and cfg.effective(4)["inter"] == 0.0
    with pytest.raises(ValueError, match="progress"):
        cfg.effective(0, 1.5)
    # a 2-epoch ramp reaches half weight at the end of epoch 0; no ramp: full weight at once
    two = LossWeights(LossConfig(ramp_epochs=2))
    assert two.effective(0, 1.0)["cooc"] == 5.0 and two.effective(1, 0.5)["cooc"] == 7.5
    assert two.effective(2, 0.0)["contrastive"] == 0.05
    assert LossWeights(LossConfig(ramp_epochs=0)).effective(0, 0.0)["cooc"] == 10.0


def test_weights_follow_the_config_loss_section() -> None:
    loss = LossConfig(bce=2.0, intra_bce=0.5, inter_bce=0.25, cooccurrence=3.0, contrastive=0.1,
                      ramp_epochs=0)
    w = LossWeights(loss, warmup_epochs=3)
    assert w.effective(0, 0.0) == {"bce": 2.0, "intra": 0.0, "inter": 0.0, "cooc": 3.0, "contrastive": 0.1}
    assert w.effective(3)["intra"] == 0.5 and w.effective(3)["inter"] == 0.25


def test_sst_loss_terms_and_total() -> None:
    gen = torch.Generator().manual_seed(2)
    B, C, F = 4, 5, 6
    logits = torch.randn(B, C, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.randn(B, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    f = torch.randn(B, C, F, generator=gen, dtype=torch.float64, requires_grad=True)
    y = rand_labels(B, C, gen)
    intra, inter = y.clone(), y.clone()
    intra[y == 0] = 1.0
    cfg = LossWeights()
    early = sst_loss_terms(logits, q, f, y, None, None, 0, 0.25, cfg, torch.Generator().manual_seed(0))
    assert set(early) == {"bce", "cooc", "contrastive"}
    w = cfg.effective(0, 0.25)
    want = early["bce"].value() + 2.5 * early["cooc"].value() + 0.0125 * early["contrastive"].value()
    assert total_loss(early, w).item() == pytest.approx(want.item(), rel=1e-12)
    late = sst_loss_terms(logits, q, f, y, intra, inter, 6, 1.0, cfg, torch.Generator().manual_seed(0))
    assert set(late) == {"bce", "intra", "inter", "cooc", "contrastive"}
    assert late["intra"].value().item() == pytest.approx(partial_bce(logits, intra).value().item())
    total = total_loss(late, cfg.effective(6))
    want = sum(cfg.effective(6)[k] * t.value() for k, t in late.items())
    assert total.item() == pytest.approx(want.item(), rel=1e-12)
    # Global denominators twice as large halve every term (what a 2-rank all-reduce would give).
    dens = {k: 2 * t.denominator for k, t in late.items()}
    assert total_loss(late, cfg.effective(6), dens).item() == pytest.approx(total.item() / 2, rel=1e-12)
    total.backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (logits, q, f))
    with pytest.raises(ValueError, match="intra_labels"):
        sst_loss_terms(logits, q, f, y, None, inter, 5, 1.0, cfg)
    with pytest.raises(KeyError, match="bogus"):
        total_loss({"bogus": Term(torch.ones(()), torch.ones(()))}, {})
    with pytest.raises(ValueError, match=r"inter_labels.*2\.0"):
        sst_loss_terms(logits, q, f, y, intra, torch.full_like(y, 2.0), 5, 1.0, cfg)


def test_single_process_path_follows_pair_targets_and_warmup_rule() -> None:
    """sst_loss_terms is the training path: loss.pair_targets=known changes its co-occurrence term
    (it was ignored there once), and the warm-up rule is the one in sst_dist.pseudo."""
    from sst_dist.pseudo import MarginSchedule, pseudo_enabled

    gen = torch.Generator().manual_seed(5)
    B, C, F = 3, 4, 5
    logits, q, f = torch.randn(B, C, generator=gen), torch.randn(B, 6, generator=gen), torch.randn(B, C, F)
    y = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 1.0]])
    known = LossWeights(LossConfig(pair_targets="known"))
    terms = sst_loss_terms(logits, q, f, y, None, None, 0, 0.5, known)
    want = cooccurrence_asl(q, y, known_only=True)
    assert torch.equal(terms["cooc"].numerator, want.numerator)
    assert terms["cooc"].denominator.item() == want.denominator.item() < B * 6
    ref = sst_loss_terms(logits, q, f, y, None, None, 0, 0.5, LossWeights())
    assert ref["cooc"].denominator.item() == B * 6
    for warm in (0, 2, 5):
        w, sched = LossWeights(warmup_epochs=warm), MarginSchedule(warmup_epochs=warm)
        for e in range(7):
            on = pseudo_enabled(e, warm)
            assert sched.pseudo_enabled(e) == on and (w.effective(e)["intra"] > 0) == on
