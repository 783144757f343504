"""Every benchmark in one command: heads, loaders, the profiled step, 1 vs 2 ranks x ZeRO, kernels (GPU).

Each benchmark runs as its own subprocess (a failure is recorded and the suite goes on) and
writes its JSON into a scratch folder; the suite gathers them into
``benchmarks/results/<machine>-<date>.json`` and a markdown report beside it. ``--quick`` runs
every part at small sizes for a sanity pass (a few minutes on 2 CPU cores); numbers from a
quick run are for checking that things work, not for quoting.

    .venv/bin/python benchmarks/suite.py [--quick] [--only heads,step] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_shards.results_out import OVERWRITE_HELP, OutputRefused, dir_output  # noqa: E402

DEBUG_CONFIG = ROOT / "launch" / "configs" / "debug.yaml"
PARTS = ("heads", "loader", "profile", "step", "kernels")


def has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def machine_name() -> str:
    """Host name, plus the GPU model when there is one: names the results file."""
    name = platform.node() or "host"
    if has_cuda():
        import torch

        name += "-" + torch.cuda.get_device_name(0)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def commands(quick: bool, scratch: Path) -> dict[str, list[str]]:
    """The argv of each part (python and script first), sized by ``quick``."""
    py = sys.executable
    heads = [py, "benchmarks/heads.py", "--out", str(scratch / "heads.json")]
    heads += ["--repeats", "2", "--warmup", "1", "--no-rss"] if quick else ["--full-step"]
    loader = [py, "benchmarks/loader.py", "--out", str(scratch / "loader")]
    loader += (
        ["--images", "24", "--workers", "1", "--epochs", "1", "--repeats", "1", "--batch-size", "8"]
        if quick
        else []
    )
    step = [py, "benchmarks/step.py", "--out", str(scratch / "step.json")]
    step += (
        ["--zero", "0", "2", "--steps", "3", "--warmup", "1", "--profile-steps", "1"]
        if quick
        else ["--repeats", "2"]
    )
    profile = [
        py,
        "-m",
        "sst_dist.cli",
        "profile",
        str(DEBUG_CONFIG),
        f"data.root={scratch / 'data'}",
        "--out",
        str(scratch / "profile"),
    ]
    profile += ["--steps", "3", "--warmup", "1", "--profile-steps", "2"] if quick else ["--steps", "20"]
    kernels = [py, "-m", "kernels.bench", "--out", str(scratch / "kernels")]
    kernels += ["--batches", "8", "--iters", "5", "--no-compile"] if quick else []
    return {"heads": heads, "loader": loader, "profile": profile, "step": step, "kernels": kernels}


def _json_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(path.rglob("*.json")) if path.is_dir() else []


def collect(part: str, scratch: Path) -> Any:
    """The JSON a part wrote (one object, or a list when it wrote several files)."""
    where = {
        "heads": scratch / "heads.json",
        "loader": scratch / "loader",
        "step": scratch / "step.json",
        "profile": scratch / "profile" / "profile.json",
        "kernels": scratch / "kernels",
    }[part]
    files = [f for f in _json_files(where) if not f.name.startswith(("trace-", "profile-rank"))]
    data = [json.loads(f.read_text()) for f in files]
    return data[0] if len(data) == 1 else (data or None)


def run_part(part: str, cmd: list[str], scratch: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    print(f"[suite] {part}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = -1, f"timed out after {timeout:.0f} s\n{(e.stdout or b'')!s}"
    wall = time.perf_counter() - t0
    rec: dict[str, Any] = {
        "command": cmd[1:],
        "returncode": rc,
        "seconds": round(wall, 1),
        "output_tail": "\n".join(text.splitlines()[-25:]),
    }
    if rc == 0:
        rec["result"] = collect(part, scratch)
    status = "ok" if rc == 0 else f"FAILED (rc {rc})"
    print(f"[suite] {part}: {status} in {wall:.0f} s", flush=True)
    return rec


# ------------------------------------------------------------------ markdown
def _table(rows: list[dict[str, Any]], limit: int = 12) -> list[str]:
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))][:limit]

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return [
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        *["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows],
    ]


def render(part: str, rec: dict[str, Any]) -> list[str]:
    """Markdown for one part: its own table when it made one, else rows of its JSON, else output."""
    out = [f"## {part}", "", f"`{' '.join(rec['command'])}` ({rec['seconds']} s)", ""]
    if rec.get("skipped"):
        return out + [f"skipped: {rec['skipped']}", ""]
    if rec["returncode"] != 0:
        return out + [f"FAILED (rc {rec['returncode']}):", "```", rec["output_tail"], "```", ""]
    res = rec.get("result")
    results = res if isinstance(res, list) else [res]
    for r in results:
        if not isinstance(r, dict):
            continue
        if isinstance(r.get("markdown"), str):
            out += [r["markdown"], ""]
        elif isinstance(r.get("table"), list):
            out += ["```", *map(str, r["table"]), "```", ""]
        elif part == "profile" and "throughput" in r:
            from sst_dist.profiling.report import format_table

            out += ["```", format_table(r), "```", ""]
        else:
            rows = next((v for v in r.values() if isinstance(v, list) and v and isinstance(v[0], dict)), None)
            out += (_table(rows) if rows else ["```", rec["output_tail"], "```"]) + [""]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=os.environ.get("SST_BENCH_PROG"), description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a sanity pass in a few minutes")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts ({', '.join(PARTS)})")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for <machine>-<date>[-quick].json and .md (default benchmarks/results)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS for every part (0: inherit; 1 on a shared box)",
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds per part (default 900 quick, 3600 full)"
    )
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        p.error(f"--only: unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    timeout = args.timeout or (900.0 if args.quick else 3600.0)
    name = f"{machine_name()}-{dt.datetime.now(dt.UTC).date().isoformat()}{'-quick' if args.quick else ''}"
    try:  # before any part runs: a refused output would otherwise lose every part's numbers
        results = dir_output(args.out_dir, [f"{name}.json", f"{name}.md"], overwrite=args.overwrite,
                             flag="--out-dir")
    except OutputRefused as e:
        return e.exit(p.prog)
    scratch = Path(tempfile.mkdtemp(prefix="sst-suite-"))
    env = dict(os.environ)
    env.pop("SST_BENCH_PROG", None)  # the benchmarks it runs name themselves
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("SST_DATA_ROOT", str(scratch / "data"))
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cuda = has_cuda()
    cmds = commands(args.quick, scratch)
    records: dict[str, Any] = {}
    try:
        for part in parts:
            if part == "kernels" and not cuda:
                records[part] = {
                    "command": cmds[part][1:],
                    "seconds": 0,
                    "returncode": 0,
                    "skipped": "no CUDA GPU",
                }
                print("[suite] kernels: skipped (no CUDA GPU)", flush=True)
                continue
            records[part] = run_part(part, cmds[part], scratch, timeout, env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    now = dt.datetime.now(dt.UTC)
    result = {
        "suite": "sst-dist",
        "omp_num_threads": env.get("OMP_NUM_THREADS"),
        "machine": machine_name(),
        "date": now.isoformat(),
        "quick": args.quick,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cuda": cuda,
        "load_avg_at_end": os.getloadavg(),
        "parts": records,
    }
    md = [
        f"# Benchmark suite: {result['machine']}, {now:%Y-%m-%d %H:%M} UTC{' (quick)' if args.quick else ''}",
        "",
        f"{os.cpu_count()} CPUs, CUDA: {cuda}, load average at end {os.getloadavg()[0]:.1f}",
        "",
    ]
    for part, rec in records.items():
        md += render(part, rec)
    print("\n".join(md))
    out = results.write(json.dumps(result, indent=1, default=str), "\n".join(md))
    print(f"wrote {out} and {results.paths[1].name}")
    failed = [k for k, v in records.items() if v.get("returncode") != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
