"""`sst-dist train` with bad data, a bad init_from file or a mistyped override: one line, exit 2.

Found by a new-user walkthrough (2026-12-06): missing shards, shards of another class count, a
converted file of another model and a train/test pair with other class lists crashed with a
traceback (exit 1), or, for the class lists, trained and scored the classes against each other
with exit 0. Each case runs the real command in this process (``sst_dist.cli.main``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures_data import make_jsonl_fixture

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "launch" / "configs" / "debug.yaml"


def _train(capsys, tmp: Path, *args: str) -> tuple[int, list[str], str]:
    """(exit status, 'sst-dist train:' lines, all of stderr) of ``sst-dist train DEBUG ...``."""
    from sst_dist.cli import main

    os.environ["DS_ACCELERATOR"] = "cpu"
    capsys.readouterr()
    rc = main(["train", str(DEBUG), f"output.root={tmp / 'runs'}", "output.name=r", "train.epochs=1", *args])
    err = capsys.readouterr().err
    return rc, [x for x in err.splitlines() if x.startswith("sst-dist train:")], err


def _shards(tmp: Path, test_classes: list[str] | None = None) -> Path:
    """A 4-class JSONL dataset converted to train and test splits (test with ``test_classes``)."""
    from data_shards.convert import convert_labeled
    from data_shards.jsonl import read_jsonl

    fx = make_jsonl_fixture(tmp)
    out = tmp / "shards"
    for split, classes in (("train", fx["classes"]), ("test", test_classes or fx["classes"])):
        data = read_jsonl(fx["jsonl"], fx["classes"])
        data.classes = list(classes)  # the same pictures, written under another class list
        convert_labeled(data, out, "js", split, num_workers=0, progress=False)
    return out


def _one_clear_line(rc: int, lines: list[str], err: str, *needles: str) -> None:
    assert rc == 2 and len(lines) == 1, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert all(n in lines[0] for n in needles), (needles, lines[0])


def test_missing_shards_exit_2_naming_the_data_root(capsys, tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    rc, lines, err = _train(capsys, tmp_path, f"data.root={empty}", "data.synthetic.enabled=false")
    _one_clear_line(rc, lines, err, f"data.root={empty}", "train")


def test_shards_of_another_class_count_exit_2(capsys, tmp_path):
    data = _shards(tmp_path)
    rc, lines, err = _train(capsys, tmp_path, f"data.root={data}", "data.synthetic.enabled=false",
                            "model.num_classes=6")
    _one_clear_line(rc, lines, err, f"data.root={data}", "4")


def test_train_and_test_splits_with_other_class_lists_exit_2(capsys, tmp_path):
    data = _shards(tmp_path, test_classes=["delta", "gamma", "beta", "alpha"])  # same names, reversed
    rc, lines, err = _train(capsys, tmp_path, f"data.root={data}", "data.synthetic.enabled=false",
                            "model.num_classes=4")
    _one_clear_line(rc, lines, err, "other classes", "index 0", "'delta'", "'alpha'")
    assert not list((tmp_path / "runs" / "r").glob("checkpoints/*")), "it trained anyway"


def test_same_class_lists_train_and_eval_refuses_other_classes(capsys, tmp_path):
    """The control of the test above (one class list trains), then ``eval`` of that run on a test
    split with the classes in another order: exit 2 with one line, not a meaningless mAP."""
    from sst_dist.cli import main

    data = _shards(tmp_path / "same")
    rc, lines, err = _train(capsys, tmp_path, f"data.root={data}", "data.synthetic.enabled=false",
                            "model.num_classes=4", "train.batch_size=4")
    assert rc == 0, err[-3000:]
    other = _shards(tmp_path / "other", test_classes=["delta", "gamma", "beta", "alpha"])
    run = tmp_path / "runs" / "r"
    for root, want in ((data, 0), (other, 2)):
        capsys.readouterr()
        rc = main(["eval", str(run), f"data.root={root}", "--out", str(tmp_path / f"eval{want}")])
        err = capsys.readouterr().err
        assert rc == want, err[-3000:]
    assert "other classes" in err and "Traceback" not in err, err[-3000:]


def test_unusable_init_from_exit_2_naming_it(capsys, tmp_path):
    text = tmp_path / "classes.txt"
    text.write_text("cat\ndog\n")
    rc, lines, err = _train(capsys, tmp_path, f"data.root={tmp_path / 'data'}", f"train.init_from={text}")
    _one_clear_line(rc, lines, err, f"train.init_from={text}")


def test_a_mistyped_override_is_blamed_not_the_file(capsys, tmp_path):
    rc, lines, err = _train(capsys, tmp_path, "train.epoch=3")
    _one_clear_line(rc, lines, err, "override 'train.epoch=3'", "did you mean train.epochs?")
    rc, lines, err = _train(capsys, tmp_path, "train.lr=inf")
    _one_clear_line(rc, lines, err, "override 'train.lr=inf'", "finite")


@pytest.mark.parametrize("what", ["missing", "file"])
def test_resume_from_says_what_is_wrong_with_the_path(capsys, tmp_path, what):
    path = tmp_path / what
    if what == "file":
        path.write_text("x")
    rc, lines, err = _train(capsys, tmp_path, f"data.root={tmp_path / 'data'}", "--resume-from", str(path))
    _one_clear_line(rc, lines, err, str(path), "does not exist" if what == "missing" else "neither")


def test_a_data_problem_on_rank_0_stops_every_rank(tmp_path):
    """Two ranks, synthetic shards made with other settings: rank 0 finds the mismatch while
    preparing the data; rank 1 must exit 2 too (before, it waited for rank 0 at a barrier)."""
    import subprocess
    import sys

    from launch_support import free_port, rank_env

    from sst_dist.config import load_config
    from sst_dist.train.data import ensure_synthetic

    small = ["data.synthetic.num_train=8", "data.synthetic.num_test=4", "data.synthetic.image_size=32"]
    ensure_synthetic(load_config(DEBUG, [f"data.root={tmp_path / 'data'}", *small]))
    port, procs = free_port(), []
    args = ["-m", "sst_dist.cli", "train", str(DEBUG), f"data.root={tmp_path / 'data'}", *small,
            "data.synthetic.num_train=9", f"output.root={tmp_path / 'runs'}", "output.name=r"]
    for rank in range(2):
        procs.append(subprocess.Popen([sys.executable, *args], env=rank_env(rank, 2, port), cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], outs
    assert "n_train" in outs[0] and "rank 0 could not prepare the data" in outs[1], outs
    assert not any("Traceback" in o for o in outs), outs
