"""Multi-label evaluation: VOC-2012 style AP / mAP and the OP/OR/OF1/CP/CR/CF1 family.

Protocol (DESIGN §4, reference utils/metrics.py):
* AP per class: sort the images by score (descending; ties keep dataset order, a stable sort -
  the reference's unstable argsort leaves tie order undefined), precision at each rank made
  monotone from the right, summed over the recall steps, i.e. the mean over the class's positives
  of the best precision at that rank or later. A class without positives has AP = NaN (the
  reference propagates NaN into mAP); mAP is the mean over classes that have positives.
* A label is predicted positive where its score >= 0 (scores are logits). Top-3 variant: only each
  image's 3 highest-scoring classes (ties by class index), still only where >= 0.
* OP = sum Nc / sum Np, OR = sum Nc / sum Ng, CP = mean_c Nc/Np, CR = mean_c Nc/Ng, with Np
  counted per class as max(1, predicted), in OP's sum too (as the reference does); CR averages
  over classes with positives (the reference gives NaN otherwise); F1 = 2PR/(P+R), 0 when
  P+R = 0. Nc: correct predictions, Np: predictions, Ng: ground-truth positives.
All values are fractions in [0, 1]; ``format_table`` prints them as percentages.
"""

from __future__ import annotations

import numpy as np
import torch

SUMMARY_KEYS = ("mAP", "OP", "OR", "OF1", "CP", "CR", "CF1")


def _to_numpy(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be (N,C), got shape {a.shape}")
    return a


def stable_desc_order(scores: np.ndarray) -> np.ndarray:
    """argsort of each row of (C,N) ``scores``, descending, ties by ascending index.

    A stable sort of 40000 floats per class is about twice as slow as numpy's quicksort, so the
    quicksort result is repaired: only entries inside runs of equal scores are re-sorted.
    """
    neg = -scores
    order = np.argsort(neg, axis=1)
    sv = np.take_along_axis(neg, order, axis=1)
    eq = sv[:, 1:] == sv[:, :-1]
    if eq.any():
        in_tie = np.zeros(sv.shape, dtype=bool)
        in_tie[:, 1:] |= eq
        in_tie[:, :-1] |= eq
        group = np.cumsum(np.concatenate([np.ones((sv.shape[0], 1), bool), ~eq], axis=1), axis=1)
        ci, pi = np.nonzero(in_tie)
        idx = order[ci, pi]
        order[ci, pi] = idx[np.lexsort((idx, group[ci, pi], ci))]
    return order


def average_precision(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per-class VOC-2012 AP (C,) from scores (N,C) and boolean positives (N,C); NaN without positives."""
    N, C = scores.shape
    st = np.ascontiguousarray(scores.T)
    order = stable_desc_order(st)
    hits = np.take_along_axis(np.ascontiguousarray(positive.T), order, axis=1)  # (C,N)
    tp = np.cumsum(hits, axis=1, dtype=np.float64)
    precision = tp / np.arange(1, N + 1, dtype=np.float64)
    best = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # monotone from the right
    n_pos = hits.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(hits, best, 0.0).sum(axis=1) / n_pos
    return np.where(n_pos > 0, ap, np.nan)


def _f1(p: float, r: float) -> float:
    return 2.0 * p * r / (p + r) if p + r > 0 else 0.0


def prf(predicted: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """OP, OR, OF1, CP, CR, CF1 for boolean predictions and ground truth (N,C)."""
    nc = (predicted & positive).sum(axis=0).astype(np.float64)
    np_ = np.maximum(predicted.sum(axis=0), 1).astype(np.float64)
    ng = positive.sum(axis=0).astype(np.float64)
    op = nc.sum() / np_.sum()
    orec = nc.sum() / ng.sum() if ng.sum() > 0 else float("nan")
    cp = float(np.mean(nc / np_))
    has = ng > 0
    cr = float(np.mean(nc[has] / ng[has])) if has.any() else float("nan")
    return {
        "OP": float(op),
        "OR": float(orec),
        "OF1": _f1(float(op), float(orec)),
        "CP": cp,
        "CR": cr,
        "CF1": _f1(cp, cr),
    }


def top_k_mask(scores: np.ndarray, k: int = 3) -> np.ndarray:
    """Boolean (N,C): each row's k highest scores (ties at the k-th value by lower class index)."""
    N, C = scores.shape
    k = min(k, C)
    if k == 0:
        return np.zeros((N, C), dtype=bool)
    kth = np.partition(scores, C - k, axis=1)[:, C - k : C - k + 1]  # k-th largest per row
    above = scores > kth
    at = scores == kth
    room = k - above.sum(axis=1, keepdims=True)
    return above | (at & (np.cumsum(at, axis=1) <= room))


def evaluate(scores: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> dict:
    """Metrics dict: mAP, OP, OR, OF1, CP, CR, CF1, the same with ``_top3``, and ``ap`` (list).

    scores (N,C): logits (positive prediction where >= 0). targets (N,C) in {1,-1} or {1,0}
    (0 and -1 both mean negative).
    """
    s = _to_numpy(scores, "scores")
    t = _to_numpy(targets, "targets")
    if s.shape != t.shape:
        raise ValueError(f"scores shape {s.shape} != targets shape {t.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} NaN/inf values")
    bad = ~np.isin(t, (1.0, 0.0, -1.0))
    if bad.any():
        raise ValueError(f"targets must contain only 1, 0, -1; found {np.unique(t[bad])[:8].tolist()}")
    positive = t > 0
    ap = average_precision(s, positive)
    out: dict = {"mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")}
    out.update(prf(s >= 0, positive))
    top = prf(top_k_mask(s, 3) & (s >= 0), positive)
    out["mAP_top3"] = out["mAP"]
    out.update({f"{k}_top3": v for k, v in top.items()})
    out["ap"] = ap.tolist()
    return out


def format_table(metrics: dict) -> str:
    """Two-row text table (all labels / top-3) of the summary metrics, in percent."""
    head = f"{'':6s}" + "".join(f"{k:>8s}" for k in SUMMARY_KEYS)
    rows = [head]
    for label, suffix in (("all", ""), ("top3", "_top3")):
        vals = [metrics.get(k + suffix, metrics.get(k, float("nan"))) for k in SUMMARY_KEYS]
        rows.append(f"{label:6s}" + "".join(f"{100.0 * v:8.2f}" for v in vals))
    return "\n".join(rows)
