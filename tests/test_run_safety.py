"""Run directories and resume: what `sst-dist train` may and may not do to an existing run.

The slow tests train the debug config once (1 epoch of 4 steps, a mid-epoch checkpoint after step
2, so the run holds two checkpoints) and give every test its own copy of that run. Each checks a
rule of issue 10 through the real command (``sst_dist.cli.main``) or the real Trainer: exit
status and one-line message for bad input, and that nothing of the run changed when it refuses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "launch" / "configs" / "debug.yaml"


def _overrides(root: Path, data: Path, name: str = "r", *extra: str) -> list[str]:
    return [
        f"output.root={root}",
        f"output.name={name}",
        f"data.root={data}",
        "train.epochs=1",
        "data.synthetic.num_train=16",
        "data.synthetic.num_test=8",
        "train.checkpoint_every=2",
        "output.keep_checkpoints=10",
        *extra,
    ]


def _train(capsys, root: Path, data: Path, *args: str) -> tuple[int, list[str]]:
    """Run ``sst-dist train`` in this process; (exit status, lines it wrote starting 'sst-dist train:')."""
    from sst_dist.cli import main

    capsys.readouterr()
    overrides = [a for a in args if not a.startswith("--") and "=" in a]
    flags = [a for a in args if a not in overrides]
    rc = main(["train", str(DEBUG), *_overrides(root, data, "r", *overrides), *flags])
    err = capsys.readouterr().err
    return rc, [x for x in err.splitlines() if x.startswith("sst-dist train:")]


def _snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of every file (and link target) of the run, except its log and lock."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = str(p.relative_to(run_dir))
        if rel in ("train.log", ".lock"):
            continue
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch run with checkpoints epoch_0000_step_00000002 and epoch_0001."""
    from sst_dist.config import load_config
    from sst_dist.train.trainer import Trainer

    os.environ["DS_ACCELERATOR"] = "cpu"
    tmp = tmp_path_factory.mktemp("safety")
    cfg = load_config(DEBUG, _overrides(tmp / "runs", tmp / "data"))
    Trainer(cfg).train()
    names = sorted(p.name for p in (tmp / "runs" / "r" / "checkpoints").iterdir() if p.is_dir())
    assert names == ["epoch_0000_step_00000002", "epoch_0001"], names
    return tmp


@pytest.fixture
def run(trained, tmp_path):
    """This test's own copy of the trained run: (runs root, data dir, run dir)."""
    shutil.copytree(trained / "runs", tmp_path / "runs", symlinks=True)
    return tmp_path / "runs", trained / "data", tmp_path / "runs" / "r"


# ---------------------------------------------------------------- fast: lock, policy, links


def test_lock_refuses_a_second_run_and_a_dead_holder_is_stale(tmp_path):
    from sst_dist.train.rundir import RunDirError, RunLock

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from sst_dist.train.rundir import RunLock; from pathlib import Path; "
            "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)",
            str(run_dir),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {holder.pid} "):
            RunLock(run_dir).acquire()
    finally:
        holder.kill()  # a crashed run: no cleanup, its lock file stays behind
        holder.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == holder.pid
    lock = RunLock(run_dir)
    lock.acquire()  # the kernel dropped the dead holder's flock: stale, taken over
    with pytest.raises(RunDirError):
        RunLock(run_dir).acquire()  # held in this process as well
    lock.release()
    RunLock(run_dir).acquire()


def test_lock_without_flock_judges_the_recorded_pid(tmp_path, monkeypatch):
    import errno
    import fcntl

    from sst_dist.train.rundir import RunDirError, RunLock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)  # a file system without flock (some Lustre mounts)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = __import__("socket").gethostname()
    (run_dir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": host, "time": time.time()}))
    RunLock(run_dir).acquire()  # stale: its pid is gone
    (run_dir / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": host, "time": time.time()}))
    with pytest.raises(RunDirError, match=f"pid {os.getppid()}"):
        RunLock(run_dir).acquire()


def test_claim_refuses_checkpoints_links_and_foreign_dirs(tmp_path):
    from data_shards.safe_io import UnsafePathError
    from sst_dist.train.rundir import RunDirError, claim

    run_dir = tmp_path / "r"
    (run_dir / "checkpoints" / "epoch_0001").mkdir(parents=True)
    refusal = "already holds checkpoints \\(epoch_0001\\).*--resume.*--overwrite"
    with pytest.raises(RunDirError, match=refusal):
        claim(run_dir, resuming=False, overwrite=False)
    claim(run_dir, resuming=True, overwrite=False).release()  # the lock was given back on refusal
    claim(run_dir, resuming=False, overwrite=True).release()

    stopped = tmp_path / "stopped"  # a run that stopped before its first checkpoint
    stopped.mkdir()
    (stopped / "config.yaml").write_text("model: {}\n")
    refusal = "earlier run's config.yaml \\(no checkpoint yet\\).*--resume.*--overwrite"
    with pytest.raises(RunDirError, match=refusal):
        claim(stopped, resuming=False, overwrite=False)
    claim(stopped, resuming=True, overwrite=False).release()
    claim(stopped, resuming=False, overwrite=True).release()
    link = tmp_path / "link"
    link.symlink_to(run_dir, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        claim(link, resuming=True, overwrite=False)
    if os.getuid() == 0:  # a directory someone else owns
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)
        with pytest.raises(UnsafePathError, match="belongs to uid 65534"):
            claim(foreign, resuming=False, overwrite=False)


def test_run_config_and_logs_never_write_through_planted_links(tmp_path):
    from data_shards.safe_io import UnsafePathError
    from sst_dist.config import load_config, save_config
    from sst_dist.train.logging_utils import MetricsWriter, setup_logging

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "train.log"):
        (run_dir / name).symlink_to(victim)
    cfg = load_config(DEBUG)
    save_config(cfg, run_dir / "config.yaml")  # what the trainer writes when training starts
    assert not (run_dir / "config.yaml").is_symlink() and load_config(run_dir / "config.yaml") == cfg
    with pytest.raises(UnsafePathError, match="metrics.jsonl"):
        MetricsWriter(run_dir, tensorboard=False)
    with pytest.raises(UnsafePathError, match="train.log"):
        setup_logging(run_dir / "train.log")
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "tensorboard").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="tensorboard"):
        MetricsWriter(run_dir, tensorboard=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "victim.txt"]  # no events written there
    assert victim.read_text() == "precious\n"


def test_metrics_of_a_resumed_run_drop_what_was_logged_after_the_checkpoint(tmp_path):
    from sst_dist.train.logging_utils import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    recs = [{"kind": "train", "step": s} for s in (2, 4, 6, 8)] + [{"kind": "epoch", "step": 8}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "train", "st')  # torn line
    w = MetricsWriter(tmp_path, tensorboard=False, keep_upto=4)
    w.write("train", 6, {"loss": 1.0})
    w.close()
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_resume_is_a_flag_and_overrides_may_follow_it(capsys):
    from sst_dist.cli import main

    assert main(["train", str(DEBUG), "--resume", "train.epochs=4", "--print-config"]) == 0
    assert "epochs: 4" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "exit status: 0 done" in text and "--resume-from PATH" in text and "--trust-checkpoint" in text


def test_resume_of_a_run_that_does_not_exist_is_refused_not_started(capsys, tmp_path):
    """A mistyped output.name with --resume used to warn and train from scratch in a new directory."""
    rc, lines = _train(capsys, tmp_path / "runs", tmp_path / "data", "output.name=typo", "--resume")
    assert rc == 2 and len(lines) == 1 and "does not exist" in lines[0] and "drop --resume" in lines[0], lines
    assert not (tmp_path / "runs" / "typo").exists() and not (tmp_path / "data").exists()


# ---------------------------------------------------------------- slow: the real command on a real run


@pytest.mark.slow
def test_fresh_run_refuses_a_run_with_checkpoints_unless_overwrite(run, capsys):
    root, data, run_dir = run
    before = _snapshot(run_dir)
    rc, lines = _train(capsys, root, data)
    assert rc == 2 and len(lines) == 1 and "already holds checkpoints" in lines[0], lines
    assert _snapshot(run_dir) == before

    rc, lines = _train(capsys, root, data, "--overwrite", "train.checkpoint_every=0")
    assert rc == 0, lines
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if r["kind"] == "epoch"] == [0]  # nothing appended to the old run's
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert names == ["epoch_0001"]  # the old mid-epoch checkpoint went with --overwrite


@pytest.mark.slow
def test_resume_flag_before_overrides_reports_a_finished_run_and_writes_nothing(run, capsys):
    root, data, run_dir = run
    before = _snapshot(run_dir)
    rc, lines = _train(capsys, root, data, "--resume", "train.epochs=1")
    assert rc == 0 and len(lines) == 1 and "already finished (1 epochs)" in lines[0], lines
    assert _snapshot(run_dir) == before


@pytest.mark.slow
def test_explicit_resume_path_that_is_not_a_usable_checkpoint_exits_2(run, capsys, tmp_path):
    root, data, run_dir = run
    before = _snapshot(run_dir)
    ck = run_dir / "checkpoints"
    (tmp_path / "a-file").write_text("x")
    for bad in (tmp_path / "missing", tmp_path / "a-file", ck / "epoch_0001" / "engine"):
        rc, lines = _train(capsys, root, data, "--resume-from", str(bad), "train.epochs=2")
        assert rc == 2 and len(lines) == 1 and str(bad) in lines[0], (bad, lines)
    older = ck / "epoch_0000_step_00000002"
    rc, lines = _train(capsys, root, data, "--resume-from", str(older), "train.epochs=2")
    assert rc == 2 and len(lines) == 1 and "would overwrite checkpoints epoch_0001" in lines[0], lines
    (older / "rank_00000.pt").write_bytes(b"torn")
    before = _snapshot(run_dir)
    rc, lines = _train(capsys, root, data, "--resume-from", str(older), "--overwrite", "train.epochs=2")
    assert rc == 2 and len(lines) == 1 and "rank_00000.pt" in lines[0], lines  # no silent fresh start
    assert _snapshot(run_dir) == before


@pytest.mark.slow
def test_failed_resume_leaves_config_and_checkpoints_alone(run, capsys):
    root, data, run_dir = run
    before = _snapshot(run_dir)
    rc, lines = _train(capsys, root, data, "--resume", "model.feature_dim=32", "train.epochs=2")
    assert rc == 2 and len(lines) == 1 and "does not fit" in lines[0] and "size mismatch" in lines[0], lines
    assert _snapshot(run_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "damaged",
    ["engine/mp_rank_00_model_states.pt", "rank_00000.pt", "sst_state.pt", "meta.json", "config.yaml"],
)
def test_any_damaged_file_of_latest_is_named_and_the_previous_checkpoint_used(run, damaged):
    from sst_dist.config import load_config
    from sst_dist.train.trainer import Trainer

    root, data, run_dir = run
    ck = run_dir / "checkpoints" / "epoch_0001"
    f = ck / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # torn write
    tr = Trainer(load_config(DEBUG, _overrides(root, data, "r", "train.epochs=2")), resume=True)
    try:
        assert tr.resumed_from is not None and tr.resumed_from.name == "epoch_0000_step_00000002"
        assert (tr.epoch, tr.global_step) == (0, 2)
    finally:
        tr.release()
    log = (run_dir / "train.log").read_text()
    warning = log.split(f"checkpoint {ck} is damaged: ")[-1].splitlines()[0]
    assert warning.startswith(str(ck)) and damaged in warning, log[-2000:]


@pytest.mark.slow
def test_best_survives_a_resume(run):
    from sst_dist.config import load_config
    from sst_dist.train.trainer import Trainer

    root, data, run_dir = run
    best = (run_dir / "checkpoints" / "best").read_text().strip()
    recorded = json.loads((run_dir / "checkpoints" / best / "meta.json").read_text())["mAP"]
    tr = Trainer(load_config(DEBUG, _overrides(root, data, "r", "train.epochs=2")), resume=True)
    tr.release()
    assert tr.best_map == pytest.approx(recorded)  # a worse epoch 2 cannot take `best` over


def _zero_first_jpeg(data: Path, split: str) -> None:
    """Make the first image of ``split`` undecodable in place (same size: the index stays valid)."""
    import tarfile

    shard = sorted(data.glob(f"*-{split}-*.tar"))[0]
    with tarfile.open(shard) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".jpg"))
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)


@pytest.mark.slow
def test_skipped_images_are_counted_per_epoch_for_training_and_evaluation(tmp_path):
    from sst_dist.config import load_config
    from sst_dist.train.data import ensure_synthetic
    from sst_dist.train.trainer import Trainer

    os.environ["DS_ACCELERATOR"] = "cpu"
    extra = ("train.epochs=2", "train.checkpoint_every=0", "train.eval_every=1")
    cfg = load_config(DEBUG, _overrides(tmp_path / "runs", tmp_path / "data", "r", *extra))
    ensure_synthetic(cfg)
    for split in ("train", "test"):
        _zero_first_jpeg(tmp_path / "data", split)
    tr = Trainer(cfg)
    tr.train()
    recs = [json.loads(x) for x in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in recs if r["kind"] == "epoch"] == [1, 1]  # per epoch
    assert [r["skipped_images"] for r in recs if r["kind"] == "eval"] == [1, 1]
    log = (tr.run_dir / "train.log").read_text()
    assert log.count("skipped: 0 non-finite steps, 1 undecodable images") == 2, log[-3000:]
    assert log.count("undecodable images skipped") == 2, log[-3000:]


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_with_overwrite_replaces_the_newer_ones(run, capsys):
    root, data, run_dir = run
    ck = run_dir / "checkpoints"
    (ck / "best").write_text("epoch_0000_step_00000002\n")  # as if the older one had the best mAP
    older = ck / "epoch_0000_step_00000002"
    rc, lines = _train(capsys, root, data, "--resume-from", str(older), "--overwrite")
    assert rc == 0, lines
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == sorted(set(steps)) == [2, 4], steps  # step 2 kept, step 4 logged once, anew
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == [older.name, "epoch_0001"]
    assert (ck / "latest").read_text().strip() == "epoch_0001"
    assert (ck / "best").read_text().strip() in (older.name, "epoch_0001")
