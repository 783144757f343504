"""Which part of SST costs or gains accuracy: ablations at one known-label proportion.

Same setup as benchmarks/accuracy.py (its run overrides), with one change per variant:
``nointer`` (no cross-image pseudo-label BCE), ``noaux`` (no co-occurrence and no contrastive
loss), ``lowmargin`` (pseudo-label margins 0.75 -> 0.5 instead of 0.95 -> 0.75, so that the
intra-image labels can fire), ``knownpairs`` (the pair head learns only from pairs whose
target is known, ``loss.pair_targets=known``). Prints each run's test mAP and pseudo-label
counts; compare with the study's sst/baseline rows. Finished runs (an eval record in
metrics.jsonl) are not rerun.

    .venv/bin/python benchmarks/accuracy_ablation.py --work /tmp/acc --variants lowmargin \
        --proportions 10 30 --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy as study  # noqa: E402

ABLATIONS = {
    "nointer": ["loss.inter_bce=0"],
    "noaux": ["loss.cooccurrence=0", "loss.contrastive=0"],
    "lowmargin": ["pseudo.margin_start=0.75", "pseudo.margin_min=0.5"],
    "knownpairs": ["loss.pair_targets=known"],
}


def run_one(work: Path, setup: argparse.Namespace, name: str, proportion: int, seed: int,
            threads: int) -> str:
    """Train one ablation run (unless finished) and return its result line."""
    run = f"sst-{name}-p{proportion:02d}-s{seed}"
    run_dir = work / "runs" / run
    try:
        res = study.read_run(run_dir)
    except (FileNotFoundError, RuntimeError):
        base = study.overrides(setup, "sst", proportion, seed, work)
        base = [o for o in base if not o.startswith("output.name=")]
        cmd = [sys.executable, "-m", "sst_dist.cli", "train", str(study.BASE_CONFIG), *base,
               f"output.name={run}", *ABLATIONS[name]]
        with open(work / "runs" / f"{run}.log", "w") as log:
            if subprocess.run(cmd, env=study._env(threads), stdout=log, stderr=subprocess.STDOUT,
                              cwd=str(study.ROOT)).returncode != 0:
                return f"{run}: failed, see {work / 'runs' / (run + '.log')}"
        res = study.read_run(run_dir)
    last = res["epochs"][-1] if res.get("epochs") else {}
    quality = {k: round(v, 3) for k, v in last.items() if k.startswith(("intra", "inter"))}
    return f"{run}: test mAP {res['mAP']:.2f} last epoch {quality}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--proportions", nargs="+", type=int, default=[10], help="known-label %%")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--work", default=str(study.ROOT / "runs" / "accuracy"), help="the study's work folder")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads-per-job", type=int, default=1)
    a = p.parse_args()
    setup = argparse.Namespace(classes=10, image_size=128, num_train=2000, num_test=500, epochs=5,
                               batch_size=32, lr=5e-4, warmup_epochs=2, margin_step=0.1)
    work = Path(a.work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    jobs = [(v, pr, sd) for v in a.variants for pr in a.proportions for sd in a.seeds]
    with ThreadPoolExecutor(a.jobs) as pool:
        lines = list(pool.map(lambda j: run_one(work, setup, *j, a.threads_per_job), jobs))
    for line in lines:
        print(line)
    return 1 if any("failed" in line for line in lines) else 0


if __name__ == "__main__":
    raise SystemExit(main())
