"""``sst-dist train CONFIG [key.sub=value ...] [--resume [PATH]]``: one rank of a training run.

Every launcher (deepspeed, torchrun, srun, or none for a single process) starts this same
command on each rank; the process group comes from the launcher's environment. The config is
loaded and validated before DeepSpeed or the data are touched, so a bad key fails at once.
"""

from __future__ import annotations

import argparse
import sys


def register(parser: argparse.ArgumentParser) -> None:
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
    from sst_dist.train.trainer import Trainer, TrainingAborted

    trainer = Trainer(cfg, resume=args.resume)
    try:
        trainer.train()
    except TrainingAborted as e:
        print(f"sst-dist train: {e}", file=sys.stderr)
        return 3
    return 0
