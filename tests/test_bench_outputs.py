"""Benchmark outputs never replace what a run did not make (sst_dist/results_out.py, one rule).

Every ``sst-dist bench`` script checks its output before any work: an explicit path that exists is
refused with exit 2 and one line naming it unless ``--overwrite``; a symbolic link is refused; a
dated default name already taken gets a free ``-2``, ``-3`` suffix. The benchmarks run in-process
at tiny sizes; where the work itself is slow (deepspeed launches, loader timing, suite parts) it
is replaced by a stub, and the stubs that raise prove the refusal comes before any work.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from data_shards.results_out import OutputRefused, dir_output, file_output

ROOT = Path(__file__).resolve().parents[1]
HEADS_TINY = ["--classes", "2", "--batch", "1", "--spatial", "1", "--feature-dim", "8", "--repeats", "1",
              "--warmup", "0", "--no-rss", "--threads", "0"]
STEP_TINY = ["--ranks", "1", "--zero", "0", "--steps", "1", "--warmup", "0", "--profile-steps", "1"]
LOADER_TINY = ["--images", "2", "--batch-size", "1", "--workers", "0", "--epochs", "1", "--repeats", "1"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def scripts():
    return {n: _script(n) for n in ("heads", "step", "loader", "suite")}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _victim(path: Path, text: str = "a checkpoint, not a result\n") -> str:
    path.write_text(text)
    return _sha(path)


def _never(*_a, **_k):
    raise AssertionError("the benchmark did work before refusing its output")


def _refused(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), err
    return lines[0]


def _fake_profile(*_a, **_k) -> dict:
    tp = {"images_per_s": 1.0}
    return {"throughput": {"model": tp, "e2e": tp}, "peak_memory_bytes": {"model": 1}, "launch_wall_s": 0.0}


# --- the rule itself ------------------------------------------------------------------------------


def test_rule_explicit_symlink_overwrite_and_dated_suffix(tmp_path):
    f = tmp_path / "x.json"
    old = _victim(f)
    with pytest.raises(OutputRefused, match=f"--out {f} exists; choose another path or pass --overwrite"):
        file_output(str(f), "unused", overwrite=False)
    (tmp_path / "link.json").symlink_to(f)
    for overwrite in (False, True):
        with pytest.raises(OutputRefused, match="is a symbolic link; refusing to write through it"):
            file_output(str(tmp_path / "link.json"), "unused", overwrite=overwrite)
    assert _sha(f) == old
    os.link(f, tmp_path / "other-name")  # --overwrite renames a new file over the name, never writes in place
    assert file_output(str(f), "unused", overwrite=True).write("new") == f and f.read_text() == "new"
    assert _sha(tmp_path / "other-name") == old
    # a dated default that is taken: -2, then -3; the old files stay as they were
    day = tmp_path / "heads-2026-01-01.json"
    old = _victim(day)
    assert file_output(None, day, overwrite=False).write("a") == tmp_path / "heads-2026-01-01-2.json"
    assert file_output(None, day, overwrite=False).write("b") == tmp_path / "heads-2026-01-01-3.json"
    assert _sha(day) == old
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_rule_name_taken_during_the_run_is_not_replaced(tmp_path, capsys):
    f = tmp_path / "out.json"
    res = file_output(str(f), "unused", overwrite=False)
    old = _victim(f)  # another run wrote it while this one worked
    assert res.write("mine") == tmp_path / "out-2.json" and _sha(f) == old
    assert res.write("mine again") == tmp_path / "out-2.json", "a later write replaces the run's own file"
    assert "appeared during the run" in capsys.readouterr().err


def test_rule_files_written_together_are_suffixed_together(tmp_path):
    _victim(tmp_path / "vm-d.md")  # only the markdown of an earlier run is left
    res = dir_output(tmp_path, ["vm-d.json", "vm-d.md"], overwrite=False)
    assert [p.name for p in res.paths] == ["vm-d-2.json", "vm-d-2.md"]
    with pytest.raises(OutputRefused, match="exists and is not a directory"):
        dir_output(tmp_path / "vm-d.md", ["x.json"], overwrite=False)


# --- heads ------------------------------------------------------------------------------------------


def test_heads_refuses_an_existing_file_before_any_work(scripts, tmp_path, capsys, monkeypatch):
    heads = scripts["heads"]
    monkeypatch.setattr(heads, "run_heads", _never)
    victim = tmp_path / "victim.pt"
    old = _victim(victim)
    _refused(capsys, heads.main([*HEADS_TINY, "--out", str(victim)]), f"--out {victim} exists", "--overwrite")
    assert _sha(victim) == old
    (tmp_path / "link.json").symlink_to(victim)
    rc = heads.main([*HEADS_TINY, "--out", str(tmp_path / "link.json"), "--overwrite"])
    _refused(capsys, rc, "link.json is a symbolic link")
    _refused(capsys, heads.main([*HEADS_TINY, "--out", str(tmp_path)]), f"--out {tmp_path} names a directory")
    assert _sha(victim) == old and sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "victim.pt"]


def test_heads_overwrite_replaces_and_a_taken_dated_name_gets_a_suffix(scripts, tmp_path, monkeypatch):
    heads = scripts["heads"]
    victim = tmp_path / "victim.json"
    _victim(victim)
    assert heads.main([*HEADS_TINY, "--out", str(victim), "--overwrite"]) == 0
    assert json.loads(victim.read_text())["heads"]
    monkeypatch.setattr(heads, "ROOT", str(tmp_path))  # the default folder: tmp/benchmarks/results
    day = tmp_path / "benchmarks" / "results" / f"heads-{dt.date.today().isoformat()}.json"
    day.parent.mkdir(parents=True)
    old = _victim(day)
    assert heads.main(HEADS_TINY) == 0
    assert _sha(day) == old and json.loads(day.with_name(f"{day.stem}-2.json").read_text())["heads"]


def test_bench_heads_refusal_through_the_cli_in_the_callers_directory(tmp_path):
    (tmp_path / "victim.pt").write_bytes(b"\x80weights")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "sst_dist.cli", "bench", "heads", *HEADS_TINY, "--out",
                           "victim.pt"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "sst-dist bench heads: --out victim.pt exists; choose another path or pass --overwrite"), proc.stderr
    assert (tmp_path / "victim.pt").read_bytes() == b"\x80weights"


# --- step -------------------------------------------------------------------------------------------


def test_step_refuses_before_any_launch(scripts, tmp_path, capsys, monkeypatch):
    step = scripts["step"]
    monkeypatch.setattr(step, "launch", _never)
    victim = tmp_path / "victim5.pt"
    old = _victim(victim)
    _refused(capsys, step.main([*STEP_TINY, "--out", str(victim)]), f"--out {victim} exists")
    (tmp_path / "link.json").symlink_to(victim)
    _refused(capsys, step.main([*STEP_TINY, "--out", str(tmp_path / "link.json")]), "is a symbolic link")
    _refused(capsys, step.main([*STEP_TINY, "--out", str(tmp_path)]), "names a directory")
    (tmp_path / "file").write_text("x")
    _refused(capsys, step.main([*STEP_TINY, "--out", str(tmp_path / "file" / "s.json")]), "cannot write into")
    assert _sha(victim) == old


def test_step_overwrite_replaces_and_a_taken_dated_name_gets_a_suffix(scripts, tmp_path, monkeypatch):
    step = scripts["step"]
    monkeypatch.setattr(step, "launch", _fake_profile)
    victim = tmp_path / "victim.json"
    _victim(victim)
    assert step.main([*STEP_TINY, "--out", str(victim), "--overwrite"]) == 0
    assert json.loads(victim.read_text())["benchmark"] == "step"
    monkeypatch.setattr(step, "ROOT", tmp_path)
    day = tmp_path / "benchmarks" / "results" / f"step-{platform.node()}-{dt.date.today().isoformat()}.json"
    day.parent.mkdir(parents=True)
    old = _victim(day)
    assert step.main(STEP_TINY) == 0
    assert _sha(day) == old and json.loads(day.with_name(f"{day.stem}-2.json").read_text())["rows"]


# --- loader -----------------------------------------------------------------------------------------


def test_loader_refuses_before_any_work(scripts, tmp_path, capsys, monkeypatch):
    loader = scripts["loader"]
    monkeypatch.setattr(loader, "make_data", _never)
    victim = tmp_path / "victim.pt"
    old = _victim(victim)
    rc = loader.main([*LOADER_TINY, "--out", str(victim)])
    _refused(capsys, rc, f"--out {victim} exists and is not a directory")
    day = tmp_path / f"loader-{dt.date.today().isoformat()}.json"
    day.symlink_to(victim)
    rc = loader.main([*LOADER_TINY, "--out", str(tmp_path), "--overwrite"])
    _refused(capsys, rc, f"{day} is a symbolic link")
    assert _sha(victim) == old


def test_loader_twice_keeps_the_first_result(scripts, tmp_path, monkeypatch):
    loader = scripts["loader"]
    monkeypatch.setattr(loader, "time_loader", lambda make, epochs: (1.0, 1.0, 1))
    day = tmp_path / f"loader-{dt.date.today().isoformat()}.json"
    assert loader.main([*LOADER_TINY, "--out", str(tmp_path)]) == 0
    old = _sha(day)
    assert loader.main([*LOADER_TINY, "--out", str(tmp_path)]) == 0
    second = day.with_name(f"{day.stem}-2.json")
    assert _sha(day) == old and json.loads(second.read_text())["results"]
    _victim(day)
    assert loader.main([*LOADER_TINY, "--out", str(tmp_path), "--overwrite"]) == 0
    assert json.loads(day.read_text())["results"] and not day.with_name(f"{day.stem}-3.json").exists()


# --- kernels ----------------------------------------------------------------------------------------


def test_kernels_refuses_before_any_work(tmp_path, capsys, monkeypatch):
    from kernels import bench

    monkeypatch.setattr(bench, "ceilings", _never)
    victim = tmp_path / "victim.pt"
    old = _victim(victim)
    _refused(capsys, bench.main(["--smoke", "--out", str(victim)]), f"--out {victim} exists and is not a dir")
    day = tmp_path / f"kernels-{bench.card_name()}-{dt.datetime.now(dt.UTC):%Y%m%d}.json"
    day.symlink_to(victim)
    _refused(capsys, bench.main(["--smoke", "--out", str(tmp_path), "--overwrite"]), f"{day} is a symbolic")
    assert _sha(victim) == old


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_kernels_without_a_gpu_or_smoke_is_a_one_line_usage_error(capsys):
    """Without a GPU only --smoke runs: that is the user's argument, exit 2 (was exit 1)."""
    from kernels import bench

    assert bench.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err and "--smoke" in err, err


def test_kernels_smoke_twice_keeps_the_first_result(tmp_path, monkeypatch):
    from kernels import bench

    make_cases = bench.make_cases
    monkeypatch.setattr(bench, "make_cases", lambda *a, **k: make_cases(*a, **k)[2:4])  # two cheap kernels
    argv = ["--smoke", "--dtypes", "float32", "--out", str(tmp_path)]
    day = tmp_path / f"kernels-{bench.card_name()}-{dt.datetime.now(dt.UTC):%Y%m%d}.json"
    old = _victim(day)
    assert bench.main(argv) == 0
    second = day.with_name(f"{day.stem}-2.json")
    # written after each of the two cases: the second write replaced the run's own file, no -3
    assert _sha(day) == old and len(json.loads(second.read_text())["runs"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([day.name, second.name])
    assert bench.main([*argv, "--overwrite"]) == 0 and json.loads(day.read_text())["runs"]


# --- suite ------------------------------------------------------------------------------------------


def _fake_part(part, cmd, scratch, timeout, env):
    return {"command": cmd[1:], "returncode": 0, "seconds": 0, "output_tail": "", "result": None}


def test_suite_refuses_before_any_part_runs(scripts, tmp_path, capsys, monkeypatch):
    suite = scripts["suite"]
    monkeypatch.setattr(suite, "run_part", _never)
    victim = tmp_path / "victim.pt"
    old = _victim(victim)
    rc = suite.main(["--only", "heads", "--out-dir", str(victim)])
    _refused(capsys, rc, f"--out-dir {victim} exists and is not a directory")
    assert _sha(victim) == old


def test_suite_twice_keeps_the_first_results(scripts, tmp_path, monkeypatch):
    suite = scripts["suite"]
    monkeypatch.setattr(suite, "run_part", _fake_part)
    argv = ["--only", "heads", "--out-dir", str(tmp_path)]
    assert suite.main(argv) == 0
    (json_1,) = tmp_path.glob("*.json")
    md_1 = json_1.with_suffix(".md")
    old = (_sha(json_1), _sha(md_1))
    assert suite.main(argv) == 0
    json_2 = json_1.with_name(f"{json_1.stem}-2.json")
    assert (_sha(json_1), _sha(md_1)) == old and json.loads(json_2.read_text())["parts"]["heads"]
    assert json_2.with_suffix(".md").read_text().startswith("# Benchmark suite")
    _victim(json_1)
    assert suite.main([*argv, "--overwrite"]) == 0 and json.loads(json_1.read_text())["parts"]
    assert len(list(tmp_path.iterdir())) == 4


def test_gpu_step_refuses_an_existing_file_before_any_work(tmp_path):
    """The device script's step benchmark follows the same rule (it runs on the CPU too)."""
    victim = tmp_path / "gpu-step.json"
    victim.write_text("an earlier card's numbers\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--out", str(victim)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "exists" in proc.stderr and "--overwrite" in proc.stderr, proc.stderr
    assert victim.read_text() == "an earlier card's numbers\n" and "full SST step" not in proc.stdout
