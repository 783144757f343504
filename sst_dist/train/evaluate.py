"""Distributed inference and evaluation: scores gathered in dataset order, metrics, artefacts.

Each rank scores its share of the test split; the (index, scores, labels) rows are all-gathered,
sorted by global index and de-duplicated (a loader may pad ranks to equal length), so the
metrics see exactly the dataset in its order whatever the world size. Rank 0 writes the table,
per-class AP JSON and a bar chart.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_shards.safe_io import atomic_write_bytes, atomic_write_text, ensure_own_dir
from sst_dist import metrics as M
from sst_dist.train import distributed as D
from sst_dist.train.logging_utils import Ticker

log = logging.getLogger("sst_dist")


@torch.no_grad()
def gather_scores(
    model: torch.nn.Module, loader: Any, device: torch.device, dtype: torch.dtype, max_batches: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index (N,), logits (N,C) float64, full labels (N,C)) over all ranks, in dataset order."""
    was_training = model.training
    model.eval()
    idx, scores, labels = [], [], []
    try:
        total = len(loader)
    except TypeError:
        total = 0
    total = min(total, max_batches) if max_batches and total else (max_batches or total)
    ticker = Ticker("evaluating: batch", total, log.info)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        ticker.tick()
        out = model(batch.images.to(device=device, dtype=dtype))
        idx.append(batch.index.to(device).long())
        scores.append(out.logits.float())
        labels.append(batch.full.to(device).float())
    model.train(was_training)
    if idx:
        local = torch.cat(
            [torch.cat(idx).double()[:, None], torch.cat(scores).double(), torch.cat(labels).double()], 1
        )
    else:
        c = int(getattr(getattr(model, "cfg", None), "num_classes", 0))
        local = torch.zeros((0, 1 + 2 * c), dtype=torch.float64, device=device)
    allrows = D.all_gather_rows(local, keep_local_grad=False).cpu().numpy()
    index = allrows[:, 0].astype(np.int64)
    index, first = np.unique(index, return_index=True)  # sorted, duplicates (padding) dropped
    allrows = allrows[first]
    c = (allrows.shape[1] - 1) // 2
    return index, allrows[:, 1 : 1 + c], allrows[:, 1 + c :]


def ap_plot_rows(names: list[str], ap: list[float]) -> list[tuple[str, float | None]]:
    """(class, AP or None) in plot order: best AP first, classes without positives (NaN AP) last."""
    rows = [(n, None if np.isnan(a) else float(a)) for n, a in zip(names, ap)]
    return sorted(rows, key=lambda r: (r[1] is None, -(r[1] or 0.0)))


def save_ap_artifacts(result: dict, class_names: list[str] | None, out_dir: str | Path, tag: str) -> Path:
    """Per-class AP JSON and a bar chart PNG (matplotlib Agg), named by ``tag``. The chart sorts
    the classes by AP and marks those without positives, so it stays readable at 80+ classes.

    Written atomically, never through a planted link, into a directory of this user's own.
    """
    out = ensure_own_dir(out_dir)
    ap = [float(a) for a in result["ap"]]
    names = class_names or [f"class_{i}" for i in range(len(ap))]
    doc = {
        "tag": tag,
        **{k: float(result[k]) for k in M.SUMMARY_KEYS},
        "ap": {n: (None if np.isnan(a) else a) for n, a in zip(names, ap)},
    }
    path = out / f"ap_{tag}.json"
    atomic_write_text(path, json.dumps(doc, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ap_plot_rows(names, ap)
    n = len(rows)
    # one horizontal bar per class, best first: names stay horizontal and legible at 80+ classes
    fig, ax = plt.subplots(figsize=(7.0, max(3.0, 0.9 + 0.16 * n)))
    y = np.arange(n)
    ax.barh(y, [0.0 if v is None else 100 * v for _, v in rows],
            color=["#3b75af" if v is not None else "#bbbbbb" for _, v in rows])
    for i, (_, v) in enumerate(rows):
        if v is None:  # no positive in the test split: AP undefined, left out of the mAP
            ax.text(1.0, i, "no positives (not in mAP)", va="center", fontsize=6, color="#555555")
    ax.set_yticks(y)
    ax.set_yticklabels([name for name, _ in rows], fontsize=6 if n > 30 else 8)
    ax.invert_yaxis()
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, 100)
    ax.axvline(100 * result["mAP"], color="#d62728", linestyle="--", linewidth=1, label="mAP")
    ax.set_xlabel("AP (%)")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"per-class AP, mAP {100 * result['mAP']:.2f} ({tag})")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out / f"ap_{tag}.png", png.getvalue())
    return path


def evaluate_model(
    model: torch.nn.Module,
    loader: Any,
    device: torch.device,
    dtype: torch.dtype,
    out_dir: str | Path | None = None,
    tag: str = "eval",
    class_names: list[str] | None = None,
    max_batches: int = 0,
) -> dict | None:
    """Metrics dict on rank 0 (None elsewhere); prints the table and writes the artefacts."""
    index, scores, labels = gather_scores(model, loader, device, dtype, max_batches)
    if D.rank() != 0:
        return None
    if len(index) == 0:
        raise ValueError("evaluation loader produced no samples")
    result = M.evaluate(scores, np.where(labels > 0, 1.0, 0.0))
    result["num_samples"] = int(len(index))
    log.info("evaluation %s on %d images:\n%s", tag, len(index), M.format_table(result))
    if out_dir is not None:
        save_ap_artifacts(result, class_names, out_dir, tag)
    return result
