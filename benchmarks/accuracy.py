"""Accuracy study: SST vs the partial-BCE baseline, and ablations, through the real trainer.

Every run is a plain ``sst-dist train`` of one run config (default launch/configs/accuracy.yaml:
pretrained EfficientNet-Lite0, the reference BatchNorm recipe, hard synthetic scenes, the
reference schedule's shape) with per-run overrides: the known-label proportion, ``train.seed``
and the method's loss/pseudo-label options (METHODS). The baseline sets the intra/inter
pseudo-label BCE, co-occurrence and contrastive weights to 0 (same trunk, data, schedule, seed).
The protocol's partial labels (mask seed 0) and the data come from the config, so SST and the
baseline of one seed differ only in the method, and differences are paired by seed.

Runs finished earlier (``study-done.json`` in the run folder) are not rerun, and the report
(docs/accuracy.md between its study markers, docs/accuracy.png and the results JSON) is drawn
from every finished run in ``--work``, so the study can run in passes. A run of an earlier pass
that stopped (preempted, killed) is continued with ``train --resume`` if it was started with the
same overrides; a run folder started otherwise is refused, never deleted (``--fresh`` redoes runs):

    .venv/bin/python benchmarks/accuracy.py --seeds 0                       # all proportions
    .venv/bin/python benchmarks/accuracy.py --seeds 0 --proportions 10 --methods nointer noaux
    .venv/bin/python benchmarks/accuracy.py --report-only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_report import PSEUDO_KEYS, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_shards.results_out import OVERWRITE_HELP, OutputRefused, file_output  # noqa: E402
from data_shards.safe_io import atomic_write_text  # noqa: E402

BASE_CONFIG = ROOT / "launch" / "configs" / "accuracy.yaml"
DONE = "study-done.json"  # a finished run's result, in its run folder
RUN_RECORD = "study-run.json"  # the overrides a run was started with: only such a run is continued
TRANSFER_OFF = ["loss.intra_bce=0", "loss.inter_bce=0", "loss.cooccurrence=0", "loss.contrastive=0"]
# method -> the overrides that make it (on top of the run config)
METHODS: dict[str, list[str]] = {
    "sst": [],
    "baseline": TRANSFER_OFF,
    "nointer": ["loss.inter_bce=0"],  # no cross-image pseudo-label BCE
    "noaux": ["loss.cooccurrence=0", "loss.contrastive=0"],  # no co-occurrence / contrastive terms
    "knownpairs": ["loss.pair_targets=known"],  # pair targets only where both labels are known
    # beyond the paper: per-class bank thresholds instead of the fixed margin (sst_dist.pseudo)
    "calibrated": ["pseudo.inter_threshold=calibrated"],
    # beyond the paper, on top of calibrated: each cross-image pseudo positive weighted by its similarity
    "weighted": ["pseudo.inter_threshold=calibrated", "pseudo.inter_weight=similarity"],
}


def run_name(method: str, proportion: int, seed: int) -> str:
    return f"{method}-p{proportion:02d}-s{seed}"


def overrides(a: argparse.Namespace, method: str, proportion: int, seed: int, work: Path) -> list[str]:
    """The full override list of one run (what makes it differ from the run config)."""
    return [
        f"data.root={work / 'data'}",
        f"data.proportion={proportion / 100}",
        f"train.seed={seed}",
        "train.progress=false",
        f"output.root={work / 'runs'}",
        f"output.name={run_name(method, proportion, seed)}",
        "output.tensorboard=false",
        "output.keep_checkpoints=1",
        *a.set,
        *METHODS[method],
    ]


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


def continuation(a: argparse.Namespace, run_dir: Path, planned: list[str]) -> list[str]:
    """How ``train`` takes up ``run_dir``: fresh, ``--resume`` (a run of this study with the same
    overrides that stopped, say by preemption: its checkpoints are kept and continued) or
    ``--overwrite`` (``--fresh``). A run directory started otherwise is refused, never deleted."""
    record = run_dir / RUN_RECORD
    if a.fresh:
        (run_dir / DONE).unlink(missing_ok=True)
        return ["--overwrite"]
    if not run_dir.exists():
        return []
    if record.is_file() and json.loads(record.read_text()) == planned:
        return ["--resume"]
    raise RuntimeError(
        f"{run_dir} holds a run this study did not start with these settings; "
        "delete it, pass --fresh to redo it, or choose another --work"
    )


def train_one(a: argparse.Namespace, method: str, proportion: int, seed: int, work: Path) -> dict[str, Any]:
    """Train and evaluate one run (unless finished); its result dict, also kept as study-done.json."""
    name = run_name(method, proportion, seed)
    run_dir = work / "runs" / name
    done = run_dir / DONE
    if done.is_file() and not a.fresh:
        return json.loads(done.read_text())
    if a.stop_launching_at and dt.datetime.now(dt.UTC).strftime("%H:%M") >= a.stop_launching_at:
        raise RuntimeError(f"run {name} not started: past --stop-launching-at {a.stop_launching_at} UTC")
    planned = overrides(a, method, proportion, seed, work)
    how = continuation(a, run_dir, planned)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RUN_RECORD, json.dumps(planned, indent=1))
    cmd = [sys.executable, "-m", "sst_dist.cli", "train", str(a.config), *planned, *how]
    t0 = time.perf_counter()
    print(f"[accuracy] {name}: started {dt.datetime.now(dt.UTC):%H:%M:%S} UTC {' '.join(how)}", flush=True)
    with open(work / "runs" / f"{name}.log", "a") as log:  # a continued run keeps its earlier log
        rc = subprocess.run(
            cmd, cwd=ROOT, env=_env(a.threads_per_job), stdout=log, stderr=subprocess.STDOUT
        ).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join((work / "runs" / f"{name}.log").read_text().splitlines()[-30:])
        raise RuntimeError(f"run {name} failed (rc {rc}); log {work / 'runs' / (name + '.log')}:\n{tail}")
    res = {
        "method": method,
        "proportion": proportion,
        "seed": seed,
        "seconds": wall,
        "overrides": METHODS[method] + list(a.set),
        **read_run(run_dir),
    }
    if not a.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    atomic_write_text(done, json.dumps(res, indent=1))
    print(f"[accuracy] {name}: mAP {res['mAP']:.2f} ({wall / 60:.1f} min)", flush=True)
    return res


def prepare_data(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Generate and shard the scenes once, before the parallel runs start (not for a report);
    the resolved settings."""
    from sst_dist.config import load_config
    from sst_dist.train.data import ensure_synthetic

    cfg = load_config(a.config, overrides(a, "sst", 10, 0, work))
    if not a.report_only:
        t0 = time.perf_counter()
        ensure_synthetic(cfg)
        print(f"[accuracy] data ready in {work / 'data'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    m, d, t, p = cfg.model, cfg.data, cfg.train, cfg.pseudo
    return {
        "backbone": m.backbone,
        "pretrained": m.pretrained,
        "freeze": m.freeze,
        "trunk_bn": m.trunk_bn,
        "num_classes": m.num_classes,
        "num_train": d.synthetic.num_train,
        "num_test": d.synthetic.num_test,
        "difficulty": d.synthetic.difficulty,
        "image_size": d.image_size,
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "lr": t.lr,
        "lr_step_epochs": t.lr_step_epochs,
        "lr_gamma": t.lr_gamma,
        "warmup_epochs": p.warmup_epochs,
        "margin_start": p.margin_start,
        "margin_step": p.margin_step,
        "margin_min": p.margin_min,
        "config": str(Path(a.config).resolve().relative_to(ROOT))
        if Path(a.config).resolve().is_relative_to(ROOT)
        else str(a.config),
        "set": list(a.set),
    }


def finished_runs(work: Path) -> list[dict[str, Any]]:
    """Every finished run of the work folder (all passes), in name order."""
    return [json.loads(p.read_text()) for p in sorted((work / "runs").glob(f"*/{DONE}"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=os.environ.get("SST_BENCH_PROG"), description=__doc__.splitlines()[0])
    p.add_argument("--proportions", type=int, nargs="+", default=[10, 30, 50, 70, 90], help="known-label %%")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["sst", "baseline"], choices=list(METHODS))
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra overrides for every run (recorded in the results)",
    )
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    p.add_argument("--threads-per-job", type=int, default=1)
    p.add_argument("--config", default=str(BASE_CONFIG))
    p.add_argument("--work", default=str(ROOT / "runs" / "accuracy"), help="data and run folders")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where accuracy.md/.png go")
    p.add_argument(
        "--results", default=None, help="JSON (default benchmarks/results/accuracy-<host>-<date>.json)"
    )
    p.add_argument("--fresh", action="store_true", help="redo runs that already finished")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--report-only", action="store_true", help="only redraw the report from finished runs")
    p.add_argument(
        "--stop-launching-at",
        default="",
        metavar="HH:MM",
        help="start no run after this UTC time (a time budget); later runs are reported as not run",
    )
    a = p.parse_args(argv)
    if any(not 0 < x <= 100 for x in a.proportions):
        p.error(f"--proportions are percentages in (0, 100], got {a.proportions}")
    if a.jobs < 1 or a.threads_per_job < 1:
        p.error("--jobs and --threads-per-job must be >= 1")
    if not Path(a.config).is_file():
        p.error(f"--config {a.config}: no such file")
    a.config = str(Path(a.config).resolve())  # the runs start in the repository root
    if a.stop_launching_at and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", a.stop_launching_at):
        p.error(f"--stop-launching-at takes HH:MM (UTC), got {a.stop_launching_at!r}")
    bad = [s for s in a.set if "=" not in s]
    if bad:
        p.error(f"--set takes KEY=VALUE, got {bad[0]!r}")
    default_json = ROOT / "benchmarks" / "results" / f"accuracy-{platform.node()}-{dt.date.today()}.json"
    try:  # before any work: a refused output would otherwise lose the study's report
        out_json = file_output(a.results, default_json, overwrite=a.overwrite, flag="--results")
    except OutputRefused as e:
        return e.exit(p.prog)
    work = Path(a.work).resolve()
    if a.report_only and not finished_runs(work):  # a mistyped --work must not blank the report
        print(f"{p.prog}: --work {work} holds no finished runs (runs/*/{DONE}); nothing to report",
              file=sys.stderr)
        return 2
    (work / "runs").mkdir(parents=True, exist_ok=True)
    settings = prepare_data(a, work)
    errors: list[str] = []
    t0 = time.perf_counter()
    if not a.report_only:
        jobs = [(m, q, s) for s in a.seeds for q in a.proportions for m in a.methods]
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            futures = [pool.submit(train_one, a, m, q, s, work) for m, q, s in jobs]
            for f in futures:
                try:
                    f.result()
                except RuntimeError as e:
                    errors.append(str(e))
                    print(f"[accuracy] {e}", file=sys.stderr, flush=True)
    results = finished_runs(work)
    meta = {
        "host": platform.node(),
        "date": dt.datetime.now(dt.UTC).isoformat(),
        "cpu_count": os.cpu_count(),
        "wall_minutes_this_pass": (time.perf_counter() - t0) / 60,
        "run_minutes_total": sum(r.get("seconds", 0.0) for r in results) / 60,
        "settings": settings,
        "methods": {m: METHODS[m] for m in sorted({r["method"] for r in results})},
        "errors": errors,
    }
    print(write_outputs(results, meta, Path(a.docs), out_json))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
