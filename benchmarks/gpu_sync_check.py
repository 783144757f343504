"""GPU proof of the sync-free step: Trainer.train_step under torch.cuda.set_sync_debug_mode("error").

Trains the debug config on the GPU (torch-gpu loader, bf16-autocast, impl auto), warms up with
logging steps, then runs non-logging steps (``sync=False``) with synchronisation debugging set to
"error": any host synchronisation raises, and the script prints where and exits 1. On the CPU it
says so and exits 0 (tests/test_sync_free.py is the CPU proof).

    python benchmarks/gpu_sync_check.py [--steps 6] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--epoch", type=int, default=1, help="1: pseudo labels and bank on (debug warm-up is 1)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sync_check: no CUDA device; the CPU proof is tests/test_sync_free.py")
        return 0
    from sst_dist.config import load_config
    from sst_dist.train.trainer import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="sst-sync-"))
    cfg = load_config(
        ROOT / "launch" / "configs" / "debug.yaml",
        [f"output.root={tmp / 'runs'}", f"data.root={tmp / 'data'}", "data.backend=torch-gpu",
         "train.precision=bf16-autocast", "train.clip_grad=1.0", *args.overrides],
    )
    tr = Trainer(cfg)
    batches = [b for _, b in zip(range(args.steps), tr.data.train_loader)]
    tr._set_train_mode()
    tr.sst.set_epoch(args.epoch)
    for b in batches[:2]:
        tr.train_step(b, args.epoch, 0.5, sync=True)
    torch.cuda.synchronize()
    ok = True
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches:
            tr.train_step(b, args.epoch, 0.5, sync=False)
    except RuntimeError:
        ok = False
        traceback.print_exc()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tr.settle()
    tr.release()
    print(f"sync-free step on {torch.cuda.get_device_name()}: {'PASS' if ok else 'FAIL'} "
          f"({len(batches)} non-logging steps, pid {os.getpid()})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
