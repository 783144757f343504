"""``sst-dist train CONFIG [key.sub=value ...] [--resume | --resume-from PATH]``: one rank of a run.

Every launcher (deepspeed, torchrun, srun, or none for a single process) starts this same
command on each rank; the process group comes from the launcher's environment. The config is
loaded and validated before DeepSpeed or the data are touched, so a bad key fails at once.
Options and overrides may come in any order (``CONFIG --resume train.epochs=4``; see sst_dist.cli).

Exit status: 0 done (or the resumed run had already finished); 2 bad config, run directory or
checkpoint (one line on stderr says which); 3 aborted after repeated non-finite losses; 75
preempted by SIGUSR1 after saving a checkpoint (rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = (
    "exit status: 0 done (or the resumed run had already finished); 2 bad config, data, run "
    "directory or checkpoint (e.g. missing shards, train and test splits with other classes, a "
    "fresh run into a directory with checkpoints, a run directory in use, an unusable "
    "--resume-from path or train.init_from file, a checkpoint that needs --trust-checkpoint); 3 aborted "
    "(non-finite losses); 75 preempted by SIGUSR1 after a checkpoint (rerun with --resume)"
)


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("config", help="run config YAML (see launch/configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, typed by the config field, e.g. data.proportion=0.1",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run from its latest good checkpoint (a fresh start if it has none yet)",
    )
    parser.add_argument(
        "--resume-from",
        metavar="PATH",
        default=None,
        help="continue from PATH: a checkpoint directory or a run directory (exit 2 if unusable)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="let a fresh run delete the checkpoints, metrics and events already in its run directory",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load checkpoint files with pickle (can run code): only for files you trust",
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
    from data_shards.safe_io import UnsafePathError, atomic_write_text
    from sst_dist.safe_load import UnsafeCheckpointError
    from sst_dist.train.checkpoint import CheckpointError
    from sst_dist.train.data import DataError
    from sst_dist.train.preemption import EXIT_PREEMPTED, Preempted
    from sst_dist.train.rundir import RunDirError
    from sst_dist.train.trainer import Trainer, TrainingAborted

    resume: bool | str = args.resume_from if args.resume_from is not None else bool(args.resume)
    try:
        trainer = Trainer(
            cfg, resume=resume, overwrite=args.overwrite, trust_checkpoint=args.trust_checkpoint
        )
    except (RunDirError, CheckpointError, DataError, ConfigError, UnsafeCheckpointError,
            UnsafePathError) as e:
        print(f"sst-dist train: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.train()
    except TrainingAborted as e:
        print(f"sst-dist train: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        print(f"sst-dist train: {e}", file=sys.stderr)
        marker = os.environ.get("SST_PREEMPTED_FILE")
        if marker and trainer.rank == 0:  # how train.sbatch tells a preemption from a failure
            atomic_write_text(marker, f"{e}\n")
        return EXIT_PREEMPTED
    if result.get("finished") and trainer.rank == 0:
        print(
            f"sst-dist train: {cfg.output.run_dir} already finished ({result['epoch']} epochs); "
            "nothing to do (raise train.epochs to train further)",
            file=sys.stderr,
        )
    return 0
