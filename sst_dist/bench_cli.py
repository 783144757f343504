"""``sst-dist bench NAME [ARGS...]``: run one of the benchmark scripts with this interpreter.

The benchmarks are standalone scripts (``benchmarks/*.py``, ``kernels/bench.py``) so they can be
run and read on their own; this subcommand only finds them in the source tree and forwards the
remaining arguments unchanged (``sst-dist bench step --help`` shows the script's own options).
Each runs as a subprocess, so a benchmark's thread settings or crash never leak into the caller.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (argv after the interpreter, one-line description)
BENCHMARKS: dict[str, tuple[list[str], str]] = {
    "heads": (["benchmarks/heads.py"], "post-backbone heads, reference vs fused (CPU)"),
    "step": (["benchmarks/step.py"], "training step images/s, 1 vs 2 CPU ranks x ZeRO 0/1/2 (deepspeed)"),
    "loader": (["benchmarks/loader.py"], "loader backends images/s at 448"),
    "kernels": (["-m", "kernels.bench"], "Triton kernel check + benchmark (GPU; --smoke on CPU)"),
    "suite": (["benchmarks/suite.py"], "every benchmark, one results file (--quick for a sanity pass)"),
    "accuracy": (["benchmarks/accuracy.py"], "SST vs partial-BCE accuracy study on synthetic scenes"),
}


EXIT_STATUSES = """exit status:
  0  the benchmark ran and finished
  2  NAME unknown, or the benchmarks are not there (not a source checkout): one line on stderr
  *  otherwise the benchmark script's own exit status (2 for its argument errors or an output it
     will not write, checked before any work: an existing --out without --overwrite, a link; 1 for
     a crash); a dated default results name already taken gets a free -2, -3 suffix"""


def register(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXIT_STATUSES
    parser.add_argument(
        "name",
        nargs="?",  # checked in run(): argparse would also call the optional ARGS required
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()),
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    parser.set_defaults(func=run)


def command(name: str, args: list[str]) -> list[str]:
    """The subprocess argv for benchmark ``name``; fails clearly outside a source checkout."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    target = BENCHMARKS[name][0]
    script = target[-1] if target[0] != "-m" else target[1].replace(".", "/") + ".py"
    if not (ROOT / script).is_file():
        raise FileNotFoundError(
            f"benchmark {name!r}: {ROOT / script} not found (the benchmarks live in the "
            "source tree; run from a checkout installed with `pip install -e .`)"
        )
    # an absolute script path: the benchmark runs in the caller's directory, so that relative
    # paths in its arguments (--out, --config, ...) mean what they mean to the caller
    return [sys.executable, *(target if target[0] == "-m" else [str(ROOT / script)]), *args]


def run(args: argparse.Namespace) -> int:
    if args.name is None:
        print(f"sst-dist bench: give a benchmark NAME: {', '.join(BENCHMARKS)} (--help says more)",
              file=sys.stderr)
        return 2
    try:
        cmd = command(args.name, list(args.args))
    except (ValueError, FileNotFoundError) as e:
        print(f"sst-dist bench: {e}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["SST_BENCH_PROG"] = f"sst-dist bench {args.name}"  # the script's usage line names this command
    return subprocess.run(cmd, env=env).returncode
