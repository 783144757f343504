"""Why pseudo labels do (not) fire: the scores a trained SST model gives the unknown labels.

Intra-image: the pair head's s_c. Cross-image: the memory bank's similarity sim[b,c] (mean
cosine of the class feature to the bank's entries of class c), over every unknown entry. Each
is compared with the margins: a source fires only where its score reaches the margin.

For every unknown (image, class) of the training split whose image has at least one known
positive (the only entries s_c can lift), compares s_c of the truly positive entries with
that of the truly negative ones: quantiles, the largest score, and the AUC (the probability
that a random true positive scores above a random true negative). A high AUC with scores far
below the margins means the pair head ranks well but is calibrated to its targets
[y_i = +1][y_j = +1] with unknowns counted as 0, which at low proportions are almost all 0.

    .venv/bin/python benchmarks/accuracy_intra_scores.py RUN_DIR [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards.loaders import build_loader  # noqa: E402
from sst_dist.pseudo import intra_scores  # noqa: E402
from sst_dist.train.inference import load_for_inference  # noqa: E402


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > that of a random negative), ties counted half (rank form)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks over ties
        tie = scores == value
        ranks[tie] = ranks[tie].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.no_grad()
def collect(run_dir: str, max_batches: int = 0) -> dict:
    model, cfg, _ = load_for_inference(run_dir)
    d = cfg.data
    loader = build_loader(d.root, d.train_split, train=False, batch_size=64, image_size=d.image_size,
                          proportion=d.proportion, seed=d.seed, num_workers=0, backend="torch",
                          num_classes=cfg.model.num_classes)
    pos, neg, ipos, ineg = [], [], [], []
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        out = model(batch.images)
        s = intra_scores(out.pair_logits, batch.partial)
        lift = (batch.partial == 0) & ((batch.partial == 1).sum(1, keepdim=True) > 0)
        pos.append(s[lift & (batch.full == 1)].numpy())
        neg.append(s[lift & (batch.full != 1)].numpy())
        sim = model.bank.similarity_reference(out.features)
        unknown = batch.partial == 0
        ipos.append(sim[unknown & (batch.full == 1)].numpy())
        ineg.append(sim[unknown & (batch.full != 1)].numpy())
    return {
        "run": str(run_dir),
        "proportion": d.proportion,
        **describe(np.concatenate(pos), np.concatenate(neg)),
        "inter": describe(np.concatenate(ipos), np.concatenate(ineg)),
    }


def describe(p: np.ndarray, n: np.ndarray) -> dict:
    """Quantiles of the scores of unknown true positives (p) and negatives (n), their maximum and AUC."""
    q = [0.5, 0.9, 0.99]
    return {
        "unknown_true_positives": int(len(p)),
        "unknown_true_negatives": int(len(n)),
        "positive_quantiles": dict(zip(map(str, q), np.quantile(p, q).round(4).tolist())) if len(p) else {},
        "negative_quantiles": dict(zip(map(str, q), np.quantile(n, q).round(4).tolist())) if len(n) else {},
        "max_score": float(max(p.max(initial=-1.0), n.max(initial=-1.0))),
        "auc": auc(p, n),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a finished SST run (its checkpoints/latest is read)")
    ap.add_argument("--max-batches", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    a = ap.parse_args()
    result = collect(a.run_dir, a.max_batches)
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
