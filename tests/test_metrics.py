"""Evaluation metrics: hand-worked AP / OP..CF1, slow loop references, input handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sst_dist.metrics import evaluate, format_table, top_k_mask


def slow_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """VOC-2012 AP for one class, literally: stable descending order, recall/precision lists padded
    with (0, 0) in front and (1, 0) behind, precision maxed from the right, summed over recall steps."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    tp = fp = 0
    rec, prec = [0.0], [0.0]
    n_pos = int(sum(positive))
    for i in order:
        tp, fp = tp + bool(positive[i]), fp + (not positive[i])
        rec.append(tp / n_pos)
        prec.append(tp / (tp + fp))
    rec.append(1.0)
    prec.append(0.0)
    for k in range(len(prec) - 1, 0, -1):
        prec[k - 1] = max(prec[k - 1], prec[k])
    return sum((rec[k + 1] - rec[k]) * prec[k + 1] for k in range(len(rec) - 1) if rec[k + 1] != rec[k])


def slow_prf(pred: np.ndarray, positive: np.ndarray) -> tuple[float, ...]:
    N, C = pred.shape
    nc, npred, ng = [0] * C, [0] * C, [0] * C
    for c in range(C):
        for n in range(N):
            nc[c] += bool(pred[n, c] and positive[n, c])
            npred[c] += bool(pred[n, c])
            ng[c] += bool(positive[n, c])
    npred = [max(1, v) for v in npred]
    op, orec = sum(nc) / sum(npred), sum(nc) / sum(ng)
    cp = sum(nc[c] / npred[c] for c in range(C)) / C
    with_pos = [c for c in range(C) if ng[c] > 0]
    cr = sum(nc[c] / ng[c] for c in with_pos) / len(with_pos)

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    return op, orec, f1(op, orec), cp, cr, f1(cp, cr)


def slow_top3(scores: np.ndarray) -> np.ndarray:
    N, C = scores.shape
    out = np.zeros((N, C), dtype=bool)
    for n in range(N):
        for c in sorted(range(C), key=lambda c: -scores[n, c])[:3]:  # ties: lower class index first
            out[n, c] = scores[n, c] >= 0
    return out


def test_ap_hand_worked() -> None:
    # Class 0: order 0.9(+) 0.8(-) 0.7(+) 0.6(-): precisions at positives 1/1, 2/3 -> AP 5/6.
    # Class 1: order 0.9(-) 0.8(+) 0.7(+) 0.6(-): precision at ranks 2, 3 = 1/2, 2/3; from the right
    #          rank 2 becomes 2/3 -> AP = (2/3 + 2/3)/2 = 2/3.
    scores = np.array([[0.9, 0.9], [0.8, 0.8], [0.7, 0.7], [0.6, 0.6]])
    targets = np.array([[1, -1], [-1, 1], [1, 1], [-1, -1]])
    m = evaluate(scores, targets)
    assert m["ap"] == pytest.approx([5 / 6, 2 / 3], rel=1e-12)
    assert m["mAP"] == pytest.approx((5 / 6 + 2 / 3) / 2, rel=1e-12)


def test_ap_ties_keep_dataset_order() -> None:
    # All scores tie: stable order is 0, 1, 2. Positive at index 1 only: precision 1/2 -> AP 1/2.
    m = evaluate(np.zeros((3, 1)), np.array([[-1], [1], [-1]]))
    assert m["ap"][0] == pytest.approx(0.5)


def test_prf_hand_worked() -> None:
    # 3 images, 2 classes. Predicted (score >= 0): class 0 -> images 0, 1; class 1 -> none.
    # Ground truth: class 0 -> images 0, 2; class 1 -> image 1.
    # Nc = [1, 0], Np = [2, max(1, 0) = 1], Ng = [2, 1].
    # OP = 1/3, OR = 1/3, OF1 = 1/3; CP = (1/2 + 0)/2 = 1/4, CR = (1/2 + 0)/2 = 1/4, CF1 = 1/4.
    scores = np.array([[0.5, -1.0], [0.0, -0.5], [-0.1, -2.0]])
    targets = np.array([[1, 0], [0, 1], [1, 0]])
    m = evaluate(scores, targets)
    for k, v in {"OP": 1 / 3, "OR": 1 / 3, "OF1": 1 / 3, "CP": 0.25, "CR": 0.25, "CF1": 0.25}.items():
        assert m[k] == pytest.approx(v, rel=1e-12), k


def test_top3_hand_worked() -> None:
    # One image, 5 classes: scores [3, -1, 2, 1, 0.5]: top-3 = classes 0, 2, 3, all >= 0.
    # Ground truth {0, 1, 4}: Nc = 1 (class 0), Ng = 3. Np per class is max(1, predicted), also in
    # OP's sum (as the reference): Np = [1, 1, 1, 1, 1] -> OP_top3 = 1/5, OR_top3 = 1/3.
    # All labels (>= 0): classes 0, 2, 3, 4 predicted, Nc = 2 (0, 4), Np sum 5 -> OP = 2/5, OR = 2/3.
    scores = np.array([[3.0, -1.0, 2.0, 1.0, 0.5]])
    targets = np.array([[1, 1, -1, -1, 1]])
    m = evaluate(scores, targets)
    assert m["OP_top3"] == pytest.approx(1 / 5) and m["OR_top3"] == pytest.approx(1 / 3)
    assert m["OP"] == pytest.approx(2 / 5) and m["OR"] == pytest.approx(2 / 3)
    # CP_top3 = (1 + 0 + 0 + 0 + 0)/5; CR_top3 over classes with positives: (1 + 0 + 0)/3.
    assert m["CP_top3"] == pytest.approx(0.2) and m["CR_top3"] == pytest.approx(1 / 3)
    # A negative score inside the top 3 is not a prediction: [-0.1, -0.2, -0.3, 5] -> only class 3.
    # Nc = 1, Np = 1 + 1 + 1 + 1 (three clamped) = 4, Ng = 2 -> OP_top3 = 1/4, OR_top3 = 1/2.
    m = evaluate(np.array([[-0.1, -0.2, -0.3, 5.0]]), np.array([[1, 0, 0, 1]]))
    assert m["OP_top3"] == pytest.approx(0.25) and m["OR_top3"] == pytest.approx(0.5)


@pytest.mark.parametrize("N,C,decimals", [(50, 3, None), (200, 7, 1), (120, 20, None), (64, 80, 0)])
def test_matches_slow_loops(N: int, C: int, decimals: int | None) -> None:
    rng = np.random.default_rng(N + C)
    scores = rng.normal(size=(N, C))
    if decimals is not None:
        scores = np.round(scores, decimals)  # many ties
    positive = rng.random((N, C)) < 0.3
    positive[0] = True  # every class has a positive
    targets = np.where(positive, 1, -1)
    m = evaluate(scores, targets)
    want_ap = [slow_ap(scores[:, c], positive[:, c]) for c in range(C)]
    assert np.allclose(m["ap"], want_ap, rtol=1e-12, atol=1e-14)
    assert m["mAP"] == pytest.approx(float(np.mean(want_ap)), rel=1e-12)
    keys = ("OP", "OR", "OF1", "CP", "CR", "CF1")
    for suffix, pred in (("", scores >= 0), ("_top3", slow_top3(scores))):
        got = [m[k + suffix] for k in keys]
        assert got == pytest.approx(list(slow_prf(pred, positive)), rel=1e-12), suffix
    assert np.array_equal(top_k_mask(scores, 3) & (scores >= 0), slow_top3(scores))


def test_plus_minus_one_equals_one_zero_and_torch_input() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(30, 6))
    pos = rng.random((30, 6)) < 0.4
    pos[0] = True
    a = evaluate(scores, np.where(pos, 1, -1))
    b = evaluate(scores, pos.astype(np.int64))
    c = evaluate(torch.from_numpy(scores).float(), torch.from_numpy(np.where(pos, 1, 0)).to(torch.int8))
    assert a == b
    assert c["mAP"] == pytest.approx(a["mAP"], rel=1e-6)


def test_class_without_positives() -> None:
    # Class 1 has no positive: AP NaN, mAP over class 0 only (AP 1), CR over class 0 only.
    scores = np.array([[1.0, 1.0], [-1.0, -1.0]])
    m = evaluate(scores, np.array([[1, -1], [-1, -1]]))
    assert m["ap"][0] == 1.0 and math.isnan(m["ap"][1])
    assert m["mAP"] == 1.0 and m["CR"] == 1.0
    assert m["CP"] == pytest.approx(0.5)  # class 1: 0 correct of 1 predicted


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="shape"):
        evaluate(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"targets.*2\.0"):
        evaluate(np.zeros((2, 2)), np.array([[1, 2], [0, -1]]))
    with pytest.raises(ValueError, match="scores.*NaN"):
        evaluate(np.array([[np.nan, 0.0]]), np.array([[1, 0]]))
    with pytest.raises(ValueError, match="scores must be"):
        evaluate(np.zeros(3), np.zeros(3))


def test_format_table() -> None:
    m = evaluate(np.array([[0.9, -0.2], [-0.3, 0.4]]), np.array([[1, 0], [0, 1]]))
    text = format_table(m)
    lines = text.splitlines()
    assert len(lines) == 3 and "mAP" in lines[0] and "CF1" in lines[0]
    assert lines[1].split()[0] == "all" and lines[2].split()[0] == "top3"
    assert float(lines[1].split()[1]) == pytest.approx(100.0)
