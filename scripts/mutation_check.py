"""Mutation check: plant each bug of scripts/mutations.py in a private copy of the tree, run the tests
that should catch it, and report caught / survived with the time taken.

Why: a test suite that passes proves little unless planted bugs make it fail. The shared checkout is
never edited: the committed tree (``git archive HEAD``, or the working tree with ``--worktree``) is
unpacked into a temporary directory, one file is mutated at a time and restored afterwards, and the
tests run there (``cwd`` and ``PYTHONPATH`` point at the copy, ahead of the editable install).

    .venv/bin/python scripts/mutation_check.py                    # every mutation, table on stdout
    .venv/bin/python scripts/mutation_check.py --only margin-off-by-one,ap-not-monotone
    .venv/bin/python scripts/mutation_check.py --json benchmarks/results/mutation-DATE.json \
        --doc docs/mutation.md

Exit status: 0 when every mutation is caught or is a documented equivalent/pending one, 1 when an
unexplained mutant survives or a baseline fails, 2 on bad arguments (an unknown id, a stale snippet).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import MUTATIONS, Mutation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def copy_tree(dest: Path, worktree: bool) -> str:
    """Unpack HEAD (or the working tree's tracked + unignored files) into ``dest``; returns a label."""
    if worktree:
        names = subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
        ).stdout.split(b"\0")
        for raw in filter(None, names):
            src = ROOT / raw.decode()
            if src.is_file() and not src.is_symlink():
                (dest / raw.decode()).parent.mkdir(parents=True, exist_ok=True)
                (dest / raw.decode()).write_bytes(src.read_bytes())
        return "working tree"
    data = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return f"HEAD {rev.stdout.strip()}"


def run_tests(tree: Path, args: list[str], timeout: float) -> tuple[int, float, str]:
    """(pytest exit status, seconds, last lines) for ``args`` run inside ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("CI", None)  # a mutant must fail by its test, not by a skip turned failure
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timeout after {timeout:.0f}s\n{(e.stdout or b'')[-2000:]!r}"
    return rc, time.perf_counter() - t0, "\n".join(out.strip().splitlines()[-3:])


def verdict(m: Mutation, rc: int) -> str:
    if rc == 1:
        return "caught"
    if rc == 0:
        if m.equivalent:
            return "survived (equivalent)"
        return f"survived (pending: {m.pending})" if m.pending else "SURVIVED"
    return f"error (pytest exit {rc})"


def check_one(tree: Path, m: Mutation, timeout: float) -> dict:
    """Apply ``m`` in ``tree``, run its tests, restore the file."""
    row = {"id": m.id, "area": m.area, "what": m.what, "file": m.path, "audit": m.audit,
           "tests": " ".join(m.tests), "equivalent": m.equivalent}
    target = tree / m.path
    original = target.read_text()
    target.write_text(original.replace(m.old, m.new, 1))
    try:
        rc, secs, tail = run_tests(tree, m.tests, timeout)
    finally:
        target.write_text(original)
    return {**row, "result": verdict(m, rc), "rc": rc, "seconds": round(secs, 1), "tail": tail}


def stale(tree: Path, ms: list[Mutation]) -> list[str]:
    """Mutations whose snippet does not occur exactly once (the code moved on)."""
    bad = []
    for m in ms:
        f = tree / m.path
        n = f.read_text().count(m.old) if f.is_file() else 0
        if n != 1:
            bad.append(f"{m.id}: snippet found {n} times in {m.path}")
    return bad


START, END = "<!-- mutation-table:start -->", "<!-- mutation-table:end -->"


def markdown(rows: list[dict], meta: dict) -> str:
    """The generated part of docs/mutation.md: the command, the table, the survivors."""
    caught = sum(r["result"] == "caught" for r in rows)
    lines = [
        START,
        f"Command: `{meta['command']}`  ",
        f"Tree: {meta['tree']}; {meta['date']}; {meta['machine']}; total {meta['seconds']:.0f} s.  ",
        f"Result: {caught} of {len(rows)} caught.",
        "",
        "| # | mutation | area | audit | tests | result | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | `{r['id']}`: {r['what']} | {r['area']} | {'yes' if r['audit'] else ''} | "
            f"`{r['tests']}` | {r['result']} | {r['seconds']:.0f} |"
        )
    notes = [r for r in rows if r["result"] != "caught"]
    if notes:
        lines += ["", "Not caught:", ""]
        lines += [f"- `{r['id']}`: {r['equivalent'] or r['result']}" for r in notes]
    return "\n".join(lines + [END]) + "\n"


def write_doc(path: Path, table: str) -> None:
    """Replace the generated block of ``path`` (the prose around it is kept), or start the file."""
    text = path.read_text() if path.is_file() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + table.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text + ("\n" if text else "# Mutation check\n\n") + table
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated mutation ids")
    ap.add_argument("--worktree", action="store_true", help="copy the working tree instead of HEAD")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per test run")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here (refuses to overwrite)")
    ap.add_argument("--doc", type=Path, help="write the markdown table here")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    a = ap.parse_args(argv)
    ms = MUTATIONS
    if a.list:
        for m in ms:
            print(f"{m.id:32s} {m.area:14s} {' '.join(m.tests)}")
        return 0
    if a.only:
        want = [s.strip() for s in a.only.split(",") if s.strip()]
        known = {m.id for m in ms}
        unknown = [w for w in want if w not in known]
        if unknown:
            print(f"mutation_check: unknown mutation id(s) {unknown}; see --list", file=sys.stderr)
            return 2
        ms = [m for m in ms if m.id in want]
    if a.json is not None and a.json.exists():
        print(f"mutation_check: {a.json} exists; not overwriting it (pick a new name)", file=sys.stderr)
        return 2
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sst-mutation-") as tmp:
        tree = Path(tmp)
        label = copy_tree(tree, a.worktree)
        bad = stale(tree, ms)
        if bad:
            print("mutation_check: stale mutation(s):\n  " + "\n  ".join(bad), file=sys.stderr)
            return 2
        failed_baseline = []
        if not a.no_baseline:
            for m in ms:
                rc, secs, tail = run_tests(tree, m.tests, a.timeout)
                print(f"baseline {m.id:32s} rc={rc} {secs:6.1f}s", flush=True)
                if rc != 0:
                    failed_baseline.append(f"{m.id}: {tail}")
        rows = []
        for m in ms:
            row = check_one(tree, m, a.timeout)
            rows.append(row)
            print(f"{row['result']:24s} {row['seconds']:7.1f}s  {m.id}", flush=True)
    total = time.perf_counter() - t_all
    cmd = "python scripts/mutation_check.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
    meta = {"command": cmd.strip(), "tree": label, "date": dt.datetime.now().isoformat(timespec="minutes"),
            "machine": f"{platform.node()} {os.cpu_count()} CPUs", "seconds": total,
            "baseline_failures": failed_baseline}
    print()
    print(markdown(rows, meta))
    if failed_baseline:
        print("baseline failures (the unmutated tests must pass):\n  " + "\n  ".join(failed_baseline))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if a.doc is not None:
        write_doc(a.doc, markdown(rows, meta))
    ok = not failed_baseline and all(
        r["result"] == "caught" or r["result"].startswith("survived (") for r in rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
