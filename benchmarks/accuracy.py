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
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_report import PSEUDO_KEYS, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "launch" / "configs" / "debug.yaml"
METHODS = ("sst", "baseline")
TRANSFER_OFF = ["loss.intra_bce=0", "loss.inter_bce=0", "loss.cooccurrence=0", "loss.contrastive=0"]


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
