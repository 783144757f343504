"""Accuracy study: SST vs the partial-BCE baseline on synthetic scenes, through the real trainer.

Every run is a plain ``sst-dist train`` of the debug config with the overrides below; the only
difference between the methods is the loss weights: the baseline sets the intra/inter pseudo-label
BCE, co-occurrence and contrastive terms to 0 (same backbone, data, schedule and seeds). The
protocol's partial labels (``np.random.seed(0)``-style mask at each proportion) and the loader
order come from ``data.seed`` = 0 in every run; ``--seeds`` vary ``train.seed`` (initialisation,
contrastive sampling). mAP is the final test evaluation; pseudo-label precision/recall per epoch
come from each run's ``metrics.jsonl``. Results: ``docs/accuracy.md``, ``docs/accuracy.png`` and
``benchmarks/results/accuracy-<host>-<date>.json``. Finished runs are skipped on a rerun.

Default size (2000 train / 500 test scenes of 10 classes at 128 px, ResNet-18 with only layer4
trained, 5 epochs, pseudo labels from epoch 2): about 2 CPU-minutes per run, 30 runs.

    .venv/bin/python benchmarks/accuracy.py [--seeds 0] [--proportions 10 50 90] [--jobs 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "launch" / "configs" / "debug.yaml"
METHODS = ("sst", "baseline")
TRANSFER_OFF = ["loss.intra_bce=0", "loss.inter_bce=0", "loss.cooccurrence=0", "loss.contrastive=0"]
PSEUDO_KEYS = (
    "intra_precision",
    "intra_recall",
    "inter_precision",
    "inter_recall",
    "intra_count",
    "inter_count",
)


def run_name(method: str, proportion: int, seed: int) -> str:
    return f"{method}-p{proportion:02d}-s{seed}"


def overrides(a: argparse.Namespace, method: str, proportion: int, seed: int, work: Path) -> list[str]:
    """The full override list of one run (what makes it differ from the debug config)."""
    C = a.classes
    o = [
        f"model.num_classes={C}",
        "model.backbone=resnet18",
        "model.pretrained=null",
        "model.freeze=layer4",
        "model.feature_dim=128",
        "model.inter_dim=64",
        "model.out_dim=128",
        "model.embed_dim=32",
        "model.time_steps=3",
        "model.bank_size=32",
        "model.impl=fused",
        f"data.root={work / 'data'}",
        f"data.proportion={proportion / 100}",
        "data.seed=0",
        f"data.image_size={a.image_size}",
        "data.backend=torch",
        "data.num_workers=0",
        "data.synthetic.enabled=true",
        f"data.synthetic.num_train={a.num_train}",
        f"data.synthetic.num_test={a.num_test}",
        f"data.synthetic.num_classes={C}",
        f"data.synthetic.image_size={a.image_size}",
        "data.synthetic.seed=0",
        f"train.epochs={a.epochs}",
        f"train.batch_size={a.batch_size}",
        f"train.lr={a.lr}",
        f"train.lr_step_epochs={max(1, a.epochs - 1)}",
        "train.lr_gamma=0.1",
        f"train.seed={seed}",
        f"train.eval_every={a.epochs}",
        "train.log_every=20",
        "train.progress=false",
        f"pseudo.warmup_epochs={a.warmup_epochs}",
        f"pseudo.margin_step={a.margin_step}",
        "loss.ramp_epochs=1",
        f"output.root={work / 'runs'}",
        f"output.name={run_name(method, proportion, seed)}",
        "output.tensorboard=false",
        "output.keep_checkpoints=1",
    ]
    return o + (TRANSFER_OFF if method == "baseline" else [])


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(var, None)
    return env


def read_run(run_dir: Path) -> dict[str, Any]:
    """Final mAP (percent) and per-epoch pseudo-label quality from a run's metrics.jsonl."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in recs if r.get("kind") == "eval"]
    if not evals:
        raise RuntimeError(f"{run_dir / 'metrics.jsonl'} has no eval record (did the run finish?)")
    epochs = [r for r in recs if r.get("kind") == "epoch"]
    return {
        "mAP": 100.0 * float(evals[-1]["mAP"]),
        "CF1": 100.0 * float(evals[-1].get("CF1", 0.0)),
        "OF1": 100.0 * float(evals[-1].get("OF1", 0.0)),
        "epochs": [
            {
                "epoch": int(r["epoch"]),
                **{k: float(r.get(k, 0.0)) for k in PSEUDO_KEYS},
                "images_per_s": float(r.get("images_per_s", 0.0)),
            }
            for r in epochs
        ],
    }


def train_one(a: argparse.Namespace, method: str, proportion: int, seed: int, work: Path) -> dict[str, Any]:
    name = run_name(method, proportion, seed)
    run_dir = work / "runs" / name
    done = run_dir / "study-done.json"
    if done.is_file() and not a.fresh:
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "sst_dist.cli",
        "train",
        str(a.config),
        *overrides(a, method, proportion, seed, work),
    ]
    t0 = time.perf_counter()
    with open(work / "runs" / f"{name}.log", "w") as log:
        rc = subprocess.run(
            cmd, cwd=ROOT, env=_env(a.threads_per_job), stdout=log, stderr=subprocess.STDOUT
        ).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join((work / "runs" / f"{name}.log").read_text().splitlines()[-30:])
        raise RuntimeError(f"run {name} failed (rc {rc}); log {work / 'runs' / (name + '.log')}:\n{tail}")
    res = {"method": method, "proportion": proportion, "seed": seed, "seconds": wall, **read_run(run_dir)}
    if not a.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    done.write_text(json.dumps(res, indent=1))
    print(f"[accuracy] {name}: mAP {res['mAP']:.2f} ({wall / 60:.1f} min)", flush=True)
    return res


def prepare_data(a: argparse.Namespace, work: Path) -> None:
    """Generate and shard the scenes once, before the parallel runs start."""
    sys.path.insert(0, str(ROOT))
    from sst_dist.config import load_config
    from sst_dist.train.data import ensure_synthetic

    cfg = load_config(a.config, overrides(a, "sst", a.proportions[0], a.seeds[0], work))
    t0 = time.perf_counter()
    ensure_synthetic(cfg)
    print(f"[accuracy] data ready in {work / 'data'} ({time.perf_counter() - t0:.0f} s)", flush=True)


# ------------------------------------------------------------------ outputs
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
    return {"mAP": maps, "pseudo": pseudo_mean}


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
    if "sst" in maps and "baseline" in maps:
        common = [q for q in props if q in maps["sst"] and q in maps["baseline"]]
        deltas = [maps["sst"][q]["mean"] - maps["baseline"][q]["mean"] for q in common]
        lines.append(
            "| SST - baseline | "
            + " | ".join(f"{d:+.2f}" for d in deltas)
            + " | "
            + (f"{statistics.fmean(deltas):+.2f} |" if deltas else "- |")
        )
    lines += [
        "",
        "mAP in %, mean ± std over seeds (std 0 with one seed).",
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proportions", type=int, nargs="+", default=[10, 30, 50, 70, 90], help="known-label %%")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--warmup-epochs", type=int, default=2, help="pseudo labels from this epoch (E0)")
    p.add_argument(
        "--margin-step",
        type=float,
        default=0.1,
        help="margin decrease per epoch after warm-up (DESIGN: 0.025 over 20 epochs; scaled to 5)",
    )
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=128, help=">= 128 keeps a 2x2 feature map (S=4)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    p.add_argument("--threads-per-job", type=int, default=1)
    p.add_argument("--config", default=str(BASE_CONFIG))
    p.add_argument("--work", default=str(ROOT / "runs" / "accuracy"), help="data and run folders")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where accuracy.md/.png go")
    p.add_argument(
        "--results", default=None, help="JSON (default benchmarks/results/accuracy-<host>-<date>.json)"
    )
    p.add_argument("--fresh", action="store_true", help="redo runs that already finished")
    p.add_argument("--keep-checkpoints", action="store_true")
    a = p.parse_args(argv)
    if any(not 0 < x <= 100 for x in a.proportions):
        p.error(f"--proportions are percentages in (0, 100], got {a.proportions}")
    if a.num_train < 1 or a.epochs < 1 or a.jobs < 1 or not 0 <= a.warmup_epochs:
        p.error("--num-train, --epochs, --jobs must be >= 1 and --warmup-epochs >= 0")
    work = Path(a.work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    prepare_data(a, work)
    jobs = [(m, q, s) for s in a.seeds for q in a.proportions for m in a.methods]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = [pool.submit(train_one, a, m, q, s, work) for m, q, s in jobs]
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except RuntimeError as e:
                errors.append(str(e))
                print(f"[accuracy] {e}", file=sys.stderr, flush=True)
    settings = {k: v for k, v in vars(a).items() if k not in ("fresh",)}
    meta = {
        "host": platform.node(),
        "date": dt.datetime.now(dt.UTC).isoformat(),
        "cpu_count": os.cpu_count(),
        "wall_minutes": (time.perf_counter() - t0) / 60,
        "settings": settings,
        "run_overrides_example": overrides(a, "sst", a.proportions[0], a.seeds[0], work),
        "baseline_extra_overrides": TRANSFER_OFF,
        "errors": errors,
    }
    out_json = (
        Path(a.results)
        if a.results
        else (
            ROOT / "benchmarks" / "results" / f"accuracy-{platform.node()}-{dt.date.today().isoformat()}.json"
        )
    )
    summary = write_outputs(results, meta, Path(a.docs), out_json)
    print(summary)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
