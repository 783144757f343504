"""Intra-image pseudo labels and the margin schedule."""

from __future__ import annotations

import math

import pytest
import torch

from sst_dist.pseudo import MarginSchedule, check_labels, intra_pseudo_labels, intra_scores


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def slow_intra(pair_logits: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Loop form: build each image's Pm pair by pair, average over known positives, threshold."""
    B, C = labels.shape
    out = labels.clone()
    for b in range(B):
        pm = [[1.0 if i == j else 0.0 for j in range(C)] for i in range(C)]
        p = 0
        for i in range(C):
            for j in range(i + 1, C):
                v = 1.0 / (1.0 + math.exp(-float(pair_logits[b, p])))
                pm[i][j] = pm[j][i] = v
                p += 1
        positives = [j for j in range(C) if labels[b, j] == 1]
        for c in range(C):
            if labels[b, c] != 0:
                continue
            s = sum(pm[c][j] for j in positives) / max(1, len(positives))
            if s >= margin:
                out[b, c] = 1
    return out


def test_hand_worked() -> None:
    # C=4, pairs in order (0,1) (0,2) (0,3) (1,2) (1,3) (2,3).
    probs = [0.9, 0.2, 0.6, 0.8, 0.95, 0.5]
    q = torch.tensor([[logit(p) for p in probs]] * 2, dtype=torch.float64)
    labels = torch.tensor([[1, 1, 0, 0], [1, 0, -1, 0]], dtype=torch.float64)
    # Image 0, positives {0, 1}: s_2 = (P02 + P12)/2 = (0.2 + 0.8)/2 = 0.5,
    #                            s_3 = (P03 + P13)/2 = (0.6 + 0.95)/2 = 0.775.
    # Image 1, positive {0}: s_1 = P01 = 0.9, s_3 = P03 = 0.6 (s_2 ignored: known -1).
    s = intra_scores(q, labels)
    assert s[0, 2].item() == pytest.approx(0.5) and s[0, 3].item() == pytest.approx(0.775)
    assert s[1, 1].item() == pytest.approx(0.9) and s[1, 3].item() == pytest.approx(0.6)
    # Known positives see the unit diagonal: s_0 (image 0) = (1 + 0.9)/2.
    assert s[0, 0].item() == pytest.approx(0.95)
    out = intra_pseudo_labels(q, labels, margin=0.75)
    assert out.tolist() == [[1, 1, 0, 1], [1, 1, -1, 0]]
    out = intra_pseudo_labels(q, labels, margin=0.5)  # s >= margin includes equality
    assert out.tolist() == [[1, 1, 1, 1], [1, 1, -1, 1]]


def test_no_positives_and_never_negative() -> None:
    # Without known positives s = 0: nothing changes even with margin 0.01; known -1 never flips.
    q = torch.full((1, 3), 10.0)
    labels = torch.tensor([[0.0, -1.0, 0.0]])
    assert torch.equal(intra_pseudo_labels(q, labels, 0.01), labels)
    # A known -1 stays -1 even when its score is far above the margin (here s_1 = P01 ~ 1).
    labels = torch.tensor([[1.0, -1.0, 0.0]])
    assert intra_scores(torch.full((1, 3), 10.0), labels)[0, 1] > 0.99
    assert intra_pseudo_labels(torch.full((1, 3), 10.0), labels, 0.5).tolist() == [[1.0, -1.0, 1.0]]
    # Low probabilities never produce -1: unknowns stay 0.
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    out = intra_pseudo_labels(torch.full((1, 3), -10.0), labels, 0.5)
    assert out.tolist() == [[1.0, 0.0, 0.0]]


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("C", [3, 7, 20])
def test_matches_slow_loop(B: int, C: int) -> None:
    gen = torch.Generator().manual_seed(B * 31 + C)
    P = C * (C - 1) // 2
    q = 2.0 * torch.randn(B, P, generator=gen, dtype=torch.float64)
    labels = torch.randint(-1, 2, (B, C), generator=gen).to(torch.int8)
    for margin in (0.3, 0.6, 0.9):
        out = intra_pseudo_labels(q, labels, margin)
        assert out.dtype == torch.int8
        assert torch.equal(out, slow_intra(q, labels, margin))


def test_does_not_track_gradients() -> None:
    q = torch.randn(2, 3, requires_grad=True)
    out = intra_pseudo_labels(q, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), 0.5)
    assert not out.requires_grad


def test_bad_inputs() -> None:
    # values are validated once where the batch is made, not per call (a device sync each time)
    with pytest.raises(ValueError, match=r"labels.*\[2\.0\]"):
        check_labels(torch.tensor([[1.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match=r"labels.*0\.5"):
        check_labels(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match=r"pair_logits.*\(1, 3\)"):
        intra_pseudo_labels(torch.zeros(1, 4), torch.zeros(1, 3), 0.5)
    with pytest.raises(ValueError, match="labels must be"):
        intra_pseudo_labels(torch.zeros(3), torch.zeros(3), 0.5)


def reference_margins(epochs: int, warmup: int = 5) -> list[float]:
    """The reference's loop: train epoch e with m, then if e >= warmup: m = max(0.75, m - 0.025)."""
    m, seen = 0.95, []
    for e in range(epochs):
        seen.append(m)
        if e >= warmup:
            m = max(0.75, m - 0.025)
    return seen


def test_margin_schedule() -> None:
    sched = MarginSchedule()
    got = [sched.margin(e) for e in range(25)]
    assert got == reference_margins(25)  # exact, same float arithmetic
    # by hand: epochs 0..5 -> 0.95, 6 -> 0.925, 13 -> 0.95 - 8 * 0.025 = 0.75, floor afterwards
    assert got[:6] == [0.95] * 6
    assert got[6] == pytest.approx(0.925) and got[13] == pytest.approx(0.75) and got[24] == 0.75
    assert [sched.pseudo_enabled(e) for e in (0, 4, 5, 6)] == [False, False, True, True]
    with pytest.raises(ValueError, match="epoch"):
        sched.margin(-1)
    with pytest.raises(ValueError, match="floor"):
        MarginSchedule(start=0.7, floor=0.75)
