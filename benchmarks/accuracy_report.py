"""Tables, plot and markdown of the accuracy study (benchmarks/accuracy.py runs it).

Kept apart from the runner: it only turns finished runs' results into docs/accuracy.{md,png} and
the results JSON, so a report can be redrawn without training anything.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

PSEUDO_KEYS = (
    "intra_precision",
    "intra_recall",
    "inter_precision",
    "inter_recall",
    "intra_count",
    "inter_count",
)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """mAP mean/std over seeds per (method, proportion), and SST's mean pseudo-label quality per epoch."""
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        table.setdefault(r["method"], {}).setdefault(r["proportion"], {"mAP": []})["mAP"].append(r["mAP"])
    maps = {
        m: {q: dict(zip(("mean", "std"), _mean_std(v["mAP"])), n=len(v["mAP"])) for q, v in sorted(d.items())}
        for m, d in table.items()
    }
    pseudo: dict[int, dict[int, dict[str, float]]] = {}
    for r in results:
        if r["method"] != "sst":
            continue
        for e in r["epochs"]:
            slot = pseudo.setdefault(r["proportion"], {}).setdefault(e["epoch"], {k: [] for k in PSEUDO_KEYS})
            for k in PSEUDO_KEYS:
                slot[k].append(e[k])
    pseudo_mean = {
        q: {ep: {k: statistics.fmean(v) for k, v in d.items()} for ep, d in sorted(eps.items())}
        for q, eps in sorted(pseudo.items())
    }
    by_run = {(r["method"], r["proportion"], r["seed"]): r["mAP"] for r in results}
    diffs: dict[int, list[float]] = {}
    for method, q, seed in sorted(by_run):
        if method == "sst" and ("baseline", q, seed) in by_run:
            diffs.setdefault(q, []).append(by_run[method, q, seed] - by_run["baseline", q, seed])
    paired = {q: dict(zip(("mean", "std"), _mean_std(d)), n=len(d)) for q, d in diffs.items()}
    return {"mAP": maps, "pseudo": pseudo_mean, "paired": paired}


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for method, rows in summary["mAP"].items():
        qs = sorted(rows)
        axes[0].errorbar(
            qs,
            [rows[q]["mean"] for q in qs],
            yerr=[rows[q]["std"] for q in qs],
            marker="o",
            capsize=3,
            label="SST" if method == "sst" else "partial BCE (baseline)",
        )
    axes[0].set_xlabel("known labels (%)")
    axes[0].set_ylabel("test mAP (%)")
    axes[0].set_title("mAP vs known-label proportion")
    axes[0].legend()
    cmap = plt.get_cmap("viridis")
    props = sorted(summary["pseudo"])
    for i, q in enumerate(props):
        eps = summary["pseudo"][q]
        xs = sorted(eps)
        colour = cmap(i / max(1, len(props) - 1))
        for ax, metric in ((axes[1], "precision"), (axes[2], "recall")):
            for kind, style in (("intra", "-o"), ("inter", "--s")):
                # precision is undefined (not 0) in an epoch without new pseudo labels: leave a gap
                ys = [
                    eps[x][f"{kind}_{metric}"]
                    if metric == "recall" or eps[x][f"{kind}_count"] > 0
                    else float("nan")
                    for x in xs
                ]
                ax.plot(xs, ys, style, color=colour, label=f"{kind} {q}%")
    for ax, metric in ((axes[1], "precision"), (axes[2], "recall")):
        ax.set_xlabel("epoch")
        ax.set_title(f"SST pseudo-label {metric}")
        ax.set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: dict[str, Any], meta: dict[str, Any], png_name: str) -> str:
    s = meta["settings"]
    maps = summary["mAP"]
    props = sorted({q for rows in maps.values() for q in rows})
    lines = [
        "# Accuracy study: SST vs partial-BCE baseline (synthetic scenes)",
        "",
        f"Measured {meta['date'][:16]} UTC on `{meta['host']}` ({meta['cpu_count']} CPUs, shared), "
        f"{meta['wall_minutes']:.0f} min wall for the runs below.",
        "",
        f"Setup: {s['num_train']} train / {s['num_test']} test synthetic scenes, {s['classes']} classes, "
        f"{s['image_size']} px; ResNet-18 (random init, only layer4 + heads trained); {s['epochs']} epochs, "
        f"batch {s['batch_size']}, Adam lr {s['lr']} (x0.1 for the last epoch); pseudo labels from epoch "
        f"{s['warmup_epochs']}, margins 0.95 - {s['margin_step']} per epoch after it (floor 0.75); "
        f"seeds {s['seeds']} (train.seed); partial-label mask seed 0 (protocol).",
        "The baseline is the same run with "
        + ", ".join(f"`{o}`" for o in meta["baseline_extra_overrides"])
        + ".",
        "",
        "Reproduce: `.venv/bin/python benchmarks/accuracy.py "
        f"--seeds {' '.join(map(str, s['seeds']))} --proportions {' '.join(map(str, s['proportions']))}`",
        "",
        "| method | " + " | ".join(f"{q}%" for q in props) + " | mean |",
        "|---|" + "---:|" * (len(props) + 1),
    ]
    for method, rows in maps.items():
        cells = [f"{rows[q]['mean']:.2f} ± {rows[q]['std']:.2f}" if q in rows else "-" for q in props]
        mean = statistics.fmean(rows[q]["mean"] for q in rows) if rows else float("nan")
        lines.append(
            f"| {'SST' if method == 'sst' else 'partial BCE'} | " + " | ".join(cells) + f" | {mean:.2f} |"
        )
    paired = summary.get("paired", {})
    if paired:
        cells = [f"{paired[q]['mean']:+.2f} ± {paired[q]['std']:.2f}" if q in paired else "-" for q in props]
        lines.append(
            "| SST - baseline (same seed) | "
            + " | ".join(cells)
            + f" | {statistics.fmean(v['mean'] for v in paired.values()):+.2f} |"
        )
    lines += [
        "",
        "mAP in %, mean ± std over seeds (std 0 with one seed); the last row is the mean ± std of "
        "the per-seed differences (SST and baseline of one seed share initialisation and data order).",
        "",
        "Pseudo labels of SST at the last epoch (mean over seeds): precision and recall of the new "
        "positives against the full labels; count = new positives per epoch.",
        "",
        "| known % | intra precision | intra recall | intra count | inter precision | inter recall | "
        "inter count |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for q, eps in summary["pseudo"].items():
        last = eps[max(eps)]
        lines.append(
            f"| {q} | {last['intra_precision']:.3f} | {last['intra_recall']:.3f} | "
            f"{last['intra_count']:.0f} | {last['inter_precision']:.3f} | {last['inter_recall']:.3f} | "
            f"{last['inter_count']:.0f} |"
        )
    if meta.get("errors"):
        lines += ["", f"{len(meta['errors'])} run(s) failed; see the results JSON."]
    lines += ["", f"![mAP vs proportion and pseudo-label quality]({png_name})", ""]
    return "\n".join(lines)


def write_outputs(results: list[dict[str, Any]], meta: dict[str, Any], docs: Path, out_json: Path) -> str:
    """Write the JSON, docs/accuracy.md and docs/accuracy.png; return the markdown."""
    summary = summarize(results)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1))
    docs.mkdir(parents=True, exist_ok=True)
    if results:
        plot(summary, docs / "accuracy.png")
    md = markdown(summary, meta, "accuracy.png")
    (docs / "accuracy.md").write_text(md)
    return md
