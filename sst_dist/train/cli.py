"""``sst-dist train CONFIG [key.sub=value ...] [--resume [PATH]]``: one rank of a training run.

Every launcher (deepspeed, torchrun, srun, or none for a single process) starts this same
command on each rank; the process group comes from the launcher's environment. The config is
loaded and validated before DeepSpeed or the data are touched, so a bad key fails at once.

Exit status: 0 done; 2 bad config; 3 aborted after repeated non-finite losses; 75 preempted by
SIGUSR1 after saving a checkpoint (rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "exit status: 0 done, 2 bad config, 3 aborted (non-finite losses), "
        "75 preempted by SIGUSR1 after a checkpoint (rerun with --resume)"
    )
    parser.add_argument("config", help="run config YAML (see launch/configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, typed by the config field, e.g. data.proportion=0.1",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="continue from the run's latest checkpoint (or from PATH: a checkpoint or run dir)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sst_dist.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"sst-dist train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from sst_dist.train.preemption import EXIT_PREEMPTED, Preempted
    from sst_dist.train.trainer import Trainer, TrainingAborted

    trainer = Trainer(cfg, resume=args.resume)
    try:
        trainer.train()
    except TrainingAborted as e:
        print(f"sst-dist train: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        print(f"sst-dist train: {e}", file=sys.stderr)
        marker = os.environ.get("SST_PREEMPTED_FILE")
        if marker and trainer.rank == 0:  # how train.sbatch tells a preemption from a failure
            Path(marker).write_text(f"{e}\n")
        return EXIT_PREEMPTED
    return 0
