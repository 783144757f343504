"""The accuracy study's driver never destroys a run or the published report by mistake (found by
an audit: an unfinished run folder, checkpoints included, was deleted before the run restarted,
and ``--report-only`` with a mistyped ``--work`` rewrote the report as an empty study, exit 0)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy  # noqa: E402

DEBUG = ROOT / "launch" / "configs" / "debug.yaml"
TINY = ["train.epochs=1", "train.max_steps_per_epoch=2", "data.synthetic.num_train=8",
        "data.synthetic.num_test=4"]


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    a = argparse.Namespace(config=str(DEBUG), set=list(TINY), fresh=False, keep_checkpoints=True,
                           stop_launching_at="", threads_per_job=1, report_only=False)
    for flag in extra:
        setattr(a, flag, True)
    return a


def _digests(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_folder_started_otherwise_is_refused_and_kept(tmp_path):
    a, run_dir = _args(tmp_path), tmp_path / "runs" / "sst-p10-s0"
    planned = accuracy.overrides(a, "sst", 10, 0, tmp_path)
    assert accuracy.continuation(a, run_dir, planned) == []  # nothing there: a fresh run
    (run_dir / "checkpoints" / "epoch_0001").mkdir(parents=True)
    (run_dir / "checkpoints" / "epoch_0001" / "meta.json").write_text("{}")
    before = _digests(run_dir)
    with pytest.raises(RuntimeError, match="did not start with these settings.*--fresh"):
        accuracy.continuation(a, run_dir, planned)  # no record of how it was started
    (run_dir / accuracy.RUN_RECORD).write_text(json.dumps(planned[:-1]))
    with pytest.raises(RuntimeError, match="did not start with these settings"):
        accuracy.continuation(a, run_dir, planned)  # started with other overrides
    (run_dir / accuracy.RUN_RECORD).write_text(json.dumps(planned))
    assert accuracy.continuation(a, run_dir, planned) == ["--resume"]
    assert _digests(run_dir) == {**before, accuracy.RUN_RECORD: _digests(run_dir)[accuracy.RUN_RECORD]}
    (run_dir / accuracy.DONE).write_text("{}")
    assert accuracy.continuation(_args(tmp_path, "fresh"), run_dir, planned) == ["--overwrite"]
    assert not (run_dir / accuracy.DONE).exists()  # --fresh: the study's own result goes, train clears


@pytest.mark.slow
def test_a_stopped_run_is_continued_with_its_checkpoints(tmp_path, monkeypatch):
    """A run that trained but stopped before its result was recorded is taken up by --resume."""
    monkeypatch.setenv("SST_DATA_ROOT", str(tmp_path / "data"))
    a, work = _args(tmp_path), tmp_path / "work"
    first = accuracy.train_one(a, "sst", 50, 0, work)
    run_dir = work / "runs" / "sst-p50-s0"
    ckpts = _digests(run_dir / "checkpoints")
    assert any(k.startswith("epoch_0001/") for k in ckpts)
    (run_dir / accuracy.DONE).unlink()  # killed after training, before the result was written
    again = accuracy.train_one(a, "sst", 50, 0, work)
    assert _digests(run_dir / "checkpoints") == ckpts  # continued (already finished), not retrained
    assert again["mAP"] == first["mAP"]
    log = (work / "runs" / "sst-p50-s0.log").read_text()
    assert "already finished" in log and log.count(" rank(s) via ") == 2  # the first pass's log is kept


def test_report_only_with_a_folder_without_runs_writes_nothing(tmp_path, capsys):
    docs, results = tmp_path / "docs", tmp_path / "r.json"
    docs.mkdir()
    (docs / "accuracy.md").write_text("# the published study\n")
    rc = accuracy.main(["--report-only", "--config", str(DEBUG), "--work", str(tmp_path / "typo"),
                        "--docs", str(docs), "--results", str(results)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "holds no finished runs" in err, err
    assert (docs / "accuracy.md").read_text() == "# the published study\n"
    assert not results.exists() and not (tmp_path / "typo").exists()


def test_an_existing_results_file_is_refused_before_any_work(tmp_path, capsys):
    """The study's JSON follows the one benchmark output rule (data_shards.results_out)."""
    results = tmp_path / "r.json"
    results.write_text("an earlier study\n")
    rc = accuracy.main(["--config", str(DEBUG), "--work", str(tmp_path / "w"), "--docs", str(tmp_path / "d"),
                        "--results", str(results)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--results" in err and "--overwrite" in err, err
    assert results.read_text() == "an earlier study\n" and not (tmp_path / "w").exists()
