"""Crafted checkpoints must not run code on ``sst-dist train --resume`` (issue 14).

A ZeRO-1 run of the debug config leaves every kind of checkpoint file: the engine's model states,
its optimizer partition, sst_state.pt and the per-rank file. Each test plants a pickle payload
(an object whose ``__reduce__`` opens a marker file for writing) in one of them, as an attacker
who can write the run directory would (meta.json's sizes updated to match), and resumes through
the real command. The marker must never appear and the command must exit 2 with one line naming
the file and ``--trust-checkpoint``. With ``--trust-checkpoint`` the payload does run, which shows
the payload is live and that only that flag opens the pickle path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "launch" / "configs" / "debug.yaml"
KINDS = [
    "engine/mp_rank_00_model_states.pt",
    "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "sst_state.pt",
    "rank_00000.pt",
]


class Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _overrides(root: Path, data: Path, *extra: str) -> list[str]:
    return [
        f"output.root={root}",
        "output.name=r",
        f"data.root={data}",
        "train.epochs=1",
        "train.zero_stage=1",
        "data.synthetic.num_train=16",
        "data.synthetic.num_test=8",
        *extra,
    ]


def plant(checkpoint: Path, rel: str, marker: Path) -> None:
    """Add a payload to one file of ``checkpoint`` and make meta.json agree with the new size."""
    f = checkpoint / rel
    obj = torch.load(f, map_location="cpu", weights_only=False)  # our own file, written by the fixture
    obj["extra"] = Payload(marker)
    torch.save(obj, f)
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["sizes"][rel] = f.stat().st_size
    (checkpoint / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from sst_dist.config import load_config
    from sst_dist.train.trainer import Trainer

    os.environ["DS_ACCELERATOR"] = "cpu"
    tmp = tmp_path_factory.mktemp("security")
    Trainer(load_config(DEBUG, _overrides(tmp / "runs", tmp / "data"))).train()
    for rel in KINDS:
        assert (tmp / "runs" / "r" / "checkpoints" / "epoch_0001" / rel).is_file(), rel
    return tmp


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained / "runs", tmp_path / "runs", symlinks=True)
    return tmp_path / "runs", trained / "data", tmp_path / "runs" / "r"


def _train(capsys, root: Path, data: Path, *flags: str) -> tuple[int, list[str]]:
    from sst_dist.cli import main

    capsys.readouterr()
    rc = main(["train", str(DEBUG), *_overrides(root, data), *flags])
    err = capsys.readouterr().err
    return rc, [x for x in err.splitlines() if x.startswith("sst-dist train:")]


@pytest.mark.slow
def test_clean_checkpoint_files_need_no_pickle(trained):
    """Every file a run writes passes the check (DeepSpeed's value types allowed, nothing else)."""
    from sst_dist.train.ckpt_files import verify_checkpoint

    meta = verify_checkpoint(trained / "runs" / "r" / "checkpoints" / "epoch_0001")
    assert set(KINDS) <= set(meta["files"])


@pytest.mark.slow
@pytest.mark.parametrize("rel", KINDS)
def test_payload_in_any_checkpoint_file_is_refused_on_resume(run, capsys, tmp_path, rel):
    root, data, run_dir = run
    marker = tmp_path / "pwned"
    plant(run_dir / "checkpoints" / "epoch_0001", rel, marker)
    rc, lines = _train(capsys, root, data, "--resume")
    assert not marker.exists(), "the payload ran"
    assert rc == 2 and len(lines) == 1, lines
    assert rel in lines[0] and "--trust-checkpoint" in lines[0] and "open)" in lines[0], lines
    rc, lines = _train(capsys, root, data, "--resume-from", str(run_dir / "checkpoints" / "epoch_0001"))
    assert rc == 2 and not marker.exists() and len(lines) == 1, lines


@pytest.mark.slow
def test_trust_checkpoint_is_the_only_way_into_pickle(run, capsys, tmp_path):
    root, data, run_dir = run
    marker = tmp_path / "pwned"
    plant(run_dir / "checkpoints" / "epoch_0001", KINDS[0], marker)
    rc, lines = _train(capsys, root, data, "--resume", "--trust-checkpoint")
    assert marker.exists(), "DeepSpeed's pickle loader did not run with --trust-checkpoint"
    assert rc == 0 and "already finished" in lines[0], lines


@pytest.mark.slow
def test_pointer_cannot_send_resume_out_of_the_run(run, capsys, tmp_path):
    """``latest`` naming another directory, or a checkpoint name that is a link out of the run,
    is ignored with a warning: the run's own newest checkpoint is resumed, no payload runs."""
    root, data, run_dir = run
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil" / "epoch_0009"
    shutil.copytree(run_dir / "checkpoints" / "epoch_0001", evil)
    plant(evil, "sst_state.pt", marker)
    ck = run_dir / "checkpoints"
    (ck / "epoch_0009").symlink_to(evil, target_is_directory=True)
    for pointer in (os.path.relpath(evil, ck), str(evil), "epoch_0009"):
        (ck / "latest").write_text(pointer + "\n")
        seen = len((run_dir / "train.log").read_text())
        rc, lines = _train(capsys, root, data, "--resume")
        assert rc == 0 and "already finished (1 epochs)" in lines[0], (pointer, lines)
        assert not marker.exists()
        log = (run_dir / "train.log").read_text()[seen:]
        assert f"pointer file {ck / 'latest'}" in log and "ignoring it" in log, log
        assert f"resumed from {ck / 'epoch_0001'} " in log, log


def test_check_torch_file_names_the_file_without_unpickling(tmp_path):
    from sst_dist.safe_load import UnsafeCheckpointError
    from sst_dist.train.ckpt_files import DamagedCheckpoint, check_torch_file, load_checkpoint_file

    marker = tmp_path / "pwned"
    f = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, f)
    with pytest.raises(UnsafeCheckpointError, match=f"{f} holds objects .*open.*--trust-checkpoint"):
        check_torch_file(f, trust=False)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(f)
    assert not marker.exists()
    check_torch_file(f, trust=True)  # structure fine; trusting it is the user's call
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(DamagedCheckpoint, match=f"{f}: truncated"):
        check_torch_file(f, trust=False)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("rel", KINDS)
def test_loads_refuse_pickle_even_past_the_file_check(run, tmp_path, monkeypatch, rel):
    """Second line of defence: with the pre-load check switched off, DeepSpeed's own loader (routed
    through weights_only) and the SST/rank-file loads still refuse the payload."""
    from sst_dist.config import load_config
    from sst_dist.safe_load import UnsafeCheckpointError
    from sst_dist.train import checkpoint
    from sst_dist.train.trainer import Trainer

    root, data, run_dir = run
    marker = tmp_path / "pwned"
    plant(run_dir / "checkpoints" / "epoch_0001", rel, marker)
    monkeypatch.setattr(checkpoint, "verify_checkpoint", lambda path, trust=False: {})
    with pytest.raises(UnsafeCheckpointError, match=rel.split("/")[-1]):
        Trainer(load_config(DEBUG, _overrides(root, data)), resume=True)
    assert not marker.exists()


def test_a_flipped_byte_is_caught_by_the_record_crc(tmp_path):
    """Same size, one bit of tensor data wrong: only the zip record's CRC tells."""
    import struct
    import zipfile

    from sst_dist.train.ckpt_files import DamagedCheckpoint, check_torch_file

    f = tmp_path / "state.pt"
    torch.save({"w": torch.arange(1000.0)}, f)
    with zipfile.ZipFile(f) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    data = bytearray(f.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match=f"{f}: record .*data/0 is corrupt"):
        check_torch_file(f, trust=False)
