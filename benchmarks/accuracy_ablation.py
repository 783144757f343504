"""Which part of SST costs or gains accuracy: ablations at one known-label proportion.

Same setup as benchmarks/accuracy.py (its run overrides), with one group of SST terms switched
off per run: ``nointer`` (no cross-image pseudo-label BCE) and ``noaux`` (no co-occurrence and
no contrastive loss). Prints each run's test mAP; compare with the study's sst/baseline rows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy as study  # noqa: E402

ABLATIONS = {
    "nointer": ["loss.inter_bce=0"],
    "noaux": ["loss.cooccurrence=0", "loss.contrastive=0"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proportion", type=int, default=10, help="known-label %%")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(study.ROOT / "runs" / "accuracy"), help="the study's work folder")
    p.add_argument("--threads-per-job", type=int, default=1)
    a = p.parse_args()
    setup = argparse.Namespace(classes=10, image_size=128, num_train=2000, num_test=500, epochs=5,
                               batch_size=32, lr=5e-4, warmup_epochs=2, margin_step=0.1)
    work = Path(a.work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, extra in ABLATIONS.items():  # both at once, one thread each
        run = f"sst-{name}-p{a.proportion:02d}-s{a.seed}"
        base = [o for o in study.overrides(setup, "sst", a.proportion, a.seed, work)
                if not o.startswith("output.name=")]
        cmd = [sys.executable, "-m", "sst_dist.cli", "train", str(study.BASE_CONFIG), *base,
               f"output.name={run}", *extra]
        log = open(work / "runs" / f"{run}.log", "w")  # noqa: SIM115
        procs[run] = subprocess.Popen(cmd, env=study._env(a.threads_per_job), stdout=log,
                                      stderr=subprocess.STDOUT, cwd=str(study.ROOT))
    failed = 0
    for run, proc in procs.items():
        if proc.wait() != 0:
            print(f"{run}: failed, see {work / 'runs' / (run + '.log')}")
            failed += 1
            continue
        print(f"{run}: test mAP {study.read_run(work / 'runs' / run)['mAP']:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
