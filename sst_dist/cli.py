"""sst-dist: train, evaluate and profile SST partial-label models; convert datasets to shards.

Each subcommand lives in its own module exposing ``register(subparsers)``; modules are imported
only when their subcommand runs, so a heavy import (DeepSpeed, DALI) never slows ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). The module's register(sub) adds arguments and sets func.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "smoke": ("sst_dist.smoke", "forward/backward smoke run of the SST model on random data"),
    "train": ("sst_dist.train.cli", "train SST from a run config (DeepSpeed engine)"),
    "eval": ("sst_dist.train.evaluate_cli", "evaluate a checkpoint on a test split"),
    "predict": ("sst_dist.train.predict_cli", "print each image's labels and scores as JSON"),
    "shards": ("data_shards.cli", "convert a dataset to WebDataset shards"),
    "convert-checkpoint": ("sst_dist.convert", "import a checkpoint of the reference SST code"),
    "bench": ("sst_dist.bench_cli", "run a benchmark (heads, step, loader, kernels, suite, accuracy)"),
    "profile": ("sst_dist.profile", "throughput profile of a run config"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sst-dist", description=__doc__.splitlines()[0].split(": ", 1)[1])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        mod = importlib.import_module(module)
        mod.register(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else "__none__")
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `sst-dist eval CKPT --config X key=value`: overrides may follow the options too
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # a subcommand that let a config error through: one line, status 2
        from sst_dist.config_schema import ConfigError

        if not isinstance(e, ConfigError):
            raise
        print(f"sst-dist {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
