"""``sst-dist profile``: mistakes exit 2 with one line naming the culprit, and the profiled run
never lands in another run's directory (found by a walkthrough: tracebacks, and a profile aimed
at a training run's directory by ``output.root``/``output.name``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli_polish import DEBUG, _one_line_error


@pytest.fixture(autouse=True)
def _cpu_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("SST_DATA_ROOT", str(tmp_path / "data"))


def profile(out: Path, *extra: str) -> list[str]:
    return ["profile", str(DEBUG), "--out", str(out), "--steps", "1", "--warmup", "0",
            "--profile-steps", "0", "--no-plot", *extra]


def test_negative_epoch(capsys, tmp_path):
    _one_line_error(capsys, profile(tmp_path / "p", "--epoch", "-3"), "--epoch", "-3")


def test_out_is_a_file(capsys, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("keep me")
    _one_line_error(capsys, profile(f), "--out", str(f), "not a directory")
    assert f.read_text() == "keep me"


def test_output_root_override_is_refused(capsys, tmp_path):
    argv = profile(tmp_path / "p", f"output.root={tmp_path / 'runs'}")
    _one_line_error(capsys, argv, "output.root", "--out")


def test_baseline_that_is_not_json_is_named(capsys, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("not json\n")
    _one_line_error(capsys, profile(tmp_path / "p", "--baseline", str(f)), str(f), "not a profile.json")


def test_a_run_directory_with_checkpoints_is_left_alone(capsys, tmp_path):
    """output.name may name the run under --out, but a directory that holds checkpoints stays."""
    ckpt = tmp_path / "p" / "mine" / "checkpoints" / "epoch_0001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    _one_line_error(capsys, profile(tmp_path / "p", "output.name=mine"), "already holds checkpoints")
    assert (ckpt / "meta.json").read_text() == "{}"


def _digests(out: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_an_earlier_profile_is_kept_unless_overwrite(capsys, tmp_path):
    """A second profile into the same --out used to replace the first one's files silently."""
    from sst_dist.cli import main

    out = tmp_path / "p"
    assert main(profile(out)) == 0
    capsys.readouterr()
    before = _digests(out)
    assert "profile.json" in before and "run/config.yaml" in before
    _one_line_error(capsys, profile(out), str(out), "already holds a profile", "profile.json", "--overwrite")
    assert _digests(out) == before

    (out / "profile-rank7.json").write_text("{}")  # a rank of a wider earlier profile
    assert main(profile(out, "--overwrite")) == 0
    after = _digests(out)
    assert "profile-rank7.json" not in after and after["profile.json"] != before["profile.json"]


def test_overwrite_never_reaches_a_training_run(capsys, tmp_path):
    ckpt = tmp_path / "p" / "mine" / "checkpoints" / "epoch_0001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    argv = profile(tmp_path / "p", "output.name=mine", "--overwrite")
    _one_line_error(capsys, argv, "already holds checkpoints")
    assert (ckpt / "meta.json").read_text() == "{}"
