"""Images/s of the SST training step on CPU ranks: 1 vs 2 ranks x ZeRO stage 0/1/2, side by side.

Each configuration is one real ``deepspeed --num_gpus R`` launch (``DS_ACCELERATOR=cpu``, gloo)
of ``sst-dist profile`` on the debug config; all of them run in one invocation, interleaved when
``--repeats`` > 1 (median kept), so machine load hits them alike. Reported: images/s of the step
on a resident synthetic batch ("model") and with the loader ("e2e"), scaling efficiency of R
ranks against 1 rank at the same stage (1.0 = linear), the cost of ZeRO 1/2 relative to stage 0
at the same rank count, peak RSS per rank, and the profiled communication/optimizer time.

Each rank gets ``--threads-per-rank`` torch threads (default 1: one core per rank, so 2 ranks
use twice the cores of 1; the efficiency then measures the distributed overhead).

    .venv/bin/python benchmarks/step.py [--ranks 1 2] [--zero 0 1 2] [--steps 8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = ROOT / "launch" / "configs" / "debug.yaml"
MODES = ("model", "e2e")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deepspeed_bin() -> str:
    exe = Path(sys.executable).parent / "deepspeed"
    found = str(exe) if exe.is_file() else shutil.which("deepspeed")
    if not found:
        raise SystemExit(
            "benchmarks/step.py: the `deepspeed` launcher is not installed next to "
            f"{sys.executable} nor on PATH"
        )
    return found


def launch(ranks: int, zero: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One deepspeed launch of ``sst-dist profile``; returns its profile.json plus wall time."""
    out = work / f"r{ranks}-z{zero}-{time.monotonic_ns()}"
    cmd = [
        _deepspeed_bin(),
        "--master_port",
        str(_free_port()),
        "--no_local_rank",
        "--num_gpus",
        str(ranks),
        "--module",
        "sst_dist.cli",
        "profile",
        str(args.config),
        f"train.zero_stage={zero}",
        f"data.root={work / 'data'}",
        *args.overrides,
        "--out",
        str(out),
        "--modes",
        ",".join(MODES),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--profile-steps",
        str(args.profile_steps),
        "--no-plot",
    ]
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS=str(args.threads_per_rank),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    result_file = out / "profile.json"
    if proc.returncode != 0 or not result_file.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"{ranks} rank(s), ZeRO {zero}: launch failed (rc {proc.returncode}):\n{tail}")
    res = json.loads(result_file.read_text())
    res["launch_wall_s"] = wall
    return res


def summarize(runs: dict[tuple[int, int], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (ranks, zero): median images/s over repeats, peak RSS, profiled comm/optimizer ms."""
    rows = []
    for (ranks, zero), reps in sorted(runs.items()):
        row: dict[str, Any] = {"ranks": ranks, "zero_stage": zero, "repeats": len(reps)}
        for mode in MODES:
            vals = [r["throughput"][mode]["images_per_s"] for r in reps if mode in r["throughput"]]
            row[f"{mode}_images_per_s"] = statistics.median(vals) if vals else None
            row[f"{mode}_images_per_s_all"] = vals
        row["peak_rss_mib"] = max(r["peak_memory_bytes"].get("model", 0) for r in reps) / 2**20
        bd = [r["breakdown"]["phases"] for r in reps if r.get("breakdown")]
        for phase in ("communication", "optimizer", "backward"):
            if bd:
                row[f"{phase}_ms"] = statistics.median(b[phase]["total_ms"] for b in bd)
        if bd:
            row["step_ms"] = statistics.median(
                r["breakdown"]["wall_ms_per_step"] for r in reps if r.get("breakdown")
            )
        rows.append(row)
    return rows


def derived(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Scaling efficiency (R ranks vs 1, same stage) and ZeRO cost (stage z vs 0, same ranks)."""
    by = {(r["ranks"], r["zero_stage"]): r for r in rows}
    scaling: dict[str, Any] = {}
    cost: dict[str, Any] = {}
    for (ranks, zero), r in by.items():
        one = by.get((1, zero))
        if ranks > 1 and one:
            scaling[f"{ranks}ranks_zero{zero}"] = {
                m: r[f"{m}_images_per_s"] / (ranks * one[f"{m}_images_per_s"])
                for m in MODES
                if r[f"{m}_images_per_s"] and one[f"{m}_images_per_s"]
            }
        base = by.get((ranks, 0))
        if zero > 0 and base:
            # fraction of stage-0 throughput lost: 0.10 = 10% slower than stage 0
            cost[f"{ranks}ranks_zero{zero}"] = {
                m: 1.0 - r[f"{m}_images_per_s"] / base[f"{m}_images_per_s"]
                for m in MODES
                if r[f"{m}_images_per_s"] and base[f"{m}_images_per_s"]
            }
    return {"scaling_efficiency": scaling, "zero_cost_vs_stage0": cost}


def markdown(rows: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    by = {(r["ranks"], r["zero_stage"]): r for r in rows}
    lines = [
        "| ranks | ZeRO | model img/s | e2e img/s | eff. (model) | eff. (e2e) | cost vs ZeRO 0 (model) | "
        "comm ms/step | optimizer ms/step | peak RSS MiB/rank |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (ranks, zero), r in sorted(by.items()):
        eff = extra["scaling_efficiency"].get(f"{ranks}ranks_zero{zero}", {})
        cost = extra["zero_cost_vs_stage0"].get(f"{ranks}ranks_zero{zero}", {})

        def f(v: Any, fmt: str = "{:.2f}") -> str:
            return "-" if v is None else fmt.format(v)

        lines.append(
            f"| {ranks} | {zero} | {f(r['model_images_per_s'])} | {f(r['e2e_images_per_s'])} | "
            f"{f(eff.get('model'))} | {f(eff.get('e2e'))} | {f(cost.get('model'), '{:+.1%}')} | "
            f"{f(r.get('communication_ms'), '{:.1f}')} | {f(r.get('optimizer_ms'), '{:.1f}')} | "
            f"{r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from data_shards.results_out import OVERWRITE_HELP, OutputRefused, file_output

    p = argparse.ArgumentParser(prog=os.environ.get("SST_BENCH_PROG"), description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every launch")
    p.add_argument("--config", default=str(DEBUG_CONFIG))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode and launch")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=2, help="profiled steps (communication/optimizer ms)")
    p.add_argument("--repeats", type=int, default=1, help="launches per configuration, interleaved (median)")
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900, help="seconds per launch")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/step-<host>-<date>.json)"
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = p.parse_args(argv)
    if min(args.ranks) < 1 or any(z not in (0, 1, 2, 3) for z in args.zero) or args.repeats < 1:
        p.error(
            f"--ranks must be >= 1, --zero in 0..3, --repeats >= 1; "
            f"got {args.ranks}, {args.zero}, {args.repeats}"
        )
    if not Path(args.config).is_file():
        p.error(f"--config {args.config}: no such file")
    args.config = str(Path(args.config).resolve())  # the launches run in the repository root
    from sst_dist.config import ConfigError, load_config

    try:  # a mistyped override is an argument error here, not a failure of every launch
        load_config(args.config, [*args.overrides, "train.zero_stage=0"])
    except (ConfigError, FileNotFoundError) as e:
        p.error(str(e))
    default = ROOT / "benchmarks" / "results" / f"step-{platform.node()}-{dt.date.today().isoformat()}.json"
    try:  # before any launch: a refused output would otherwise lose the run's numbers
        results = file_output(args.out, default, overwrite=args.overwrite)
    except OutputRefused as e:
        return e.exit(p.prog)
    if 1 not in args.ranks and max(args.ranks) > 1:
        print("note: without --ranks 1 there is no scaling baseline", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="sst-bench-step-"))
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
    order = [(r, z) for r in args.ranks for z in args.zero]
    try:
        for rep in range(args.repeats):
            for ranks, zero in order if rep % 2 == 0 else order[::-1]:
                print(f"[step] repeat {rep + 1}/{args.repeats}: {ranks} rank(s), ZeRO {zero} ...", flush=True)
                res = launch(ranks, zero, args, work)
                runs.setdefault((ranks, zero), []).append(res)
                print(
                    f"[step]   model {res['throughput']['model']['images_per_s']:.2f} img/s, "
                    f"e2e {res['throughput']['e2e']['images_per_s']:.2f} img/s "
                    f"({res['launch_wall_s']:.0f} s launch)",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = summarize(runs)
    extra = derived(rows)
    table = markdown(rows, extra)
    result = {
        "benchmark": "step",
        "host": platform.node(),
        "date": dt.datetime.now(dt.UTC).isoformat(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "config": str(args.config),
        "overrides": args.overrides,
        "threads_per_rank": args.threads_per_rank,
        "steps": args.steps,
        "rows": rows,
        **extra,
        "markdown": table,
    }
    out = results.write(json.dumps(result, indent=1))
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
