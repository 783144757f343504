"""The one inference path: every checkpoint kind gives the trained model, and nothing is unpickled.

Two real one-epoch runs (DeepSpeed on the CPU accelerator, debug config): ZeRO stage 0 (one
consolidated module file) and stage 3 (per-rank partitions only). The crafted files below carry
an object whose ``__reduce__`` writes a marker file: loading them with pickle enabled creates
the marker (checked with ``--trust-checkpoint``, so the payload is known to be live), and eval and
predict must refuse them with one line and exit 2 without the marker ever appearing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sst_dist.cli import main
from sst_dist.config import load_config

DEBUG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "debug.yaml"


class Payload:
    """Unpickling this writes ``marker``: stands for any code a crafted checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{stage: (trainer, run_dir)} for ZeRO stages 0 and 3, one epoch each, shared data."""
    from sst_dist.train.trainer import Trainer

    saved = dict(os.environ)
    os.environ["DS_ACCELERATOR"] = "cpu"
    tmp = tmp_path_factory.mktemp("inference")
    out = {}
    for stage in (0, 3):
        cfg = load_config(
            DEBUG,
            [
                f"output.root={tmp / f'runs{stage}'}",
                f"data.root={tmp / 'data'}",
                f"train.zero_stage={stage}",
                "train.epochs=1",
            ],
        )
        tr = Trainer(cfg)
        tr.train()
        out[stage] = (tr, tr.run_dir)
    yield out, tmp
    os.environ.clear()
    os.environ.update(saved)


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def _last_json(text: str) -> dict:
    return json.loads([x for x in text.splitlines() if x.startswith("{")][-1])


@pytest.mark.slow
def test_every_source_kind_gives_the_trained_weights(runs):
    from sst_dist.train.inference import load_for_inference

    tr, run_dir = runs[0][0]
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    want = tr.model.state_dict()
    for source in (run_dir, ckpt, run_dir / "checkpoints" / "best", run_dir / "checkpoints" / "latest"):
        model, cfg, meta = load_for_inference(source)
        assert meta["checkpoint"] == ckpt and meta["kind"] == "run" and not model.training
        got = model.state_dict()
        assert set(got) == set(want)
        for k, v in want.items():
            assert torch.equal(got[k], v.float() if v.is_floating_point() else v), k
        assert cfg == load_config(run_dir / "config.yaml")


@pytest.mark.slow
def test_zero3_consolidation_equals_deepspeeds_for_one_and_two_ranks(runs, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from sst_dist.train.ckpt_files import load_checkpoint_file
    from sst_dist.train.inference import consolidate_zero3, load_for_inference

    _, run_dir = runs[0][3]
    ckpt = run_dir / "checkpoints" / "epoch_0001"

    def same(engine_parent: Path) -> None:
        ref = get_fp32_state_dict_from_zero_checkpoint(str(engine_parent), tag="engine")
        mine = consolidate_zero3(engine_parent / "engine")
        assert set(mine) == set(ref)
        for k, v in ref.items():
            assert torch.equal(mine[k], v.float() if v.is_floating_point() else v), k

    same(ckpt)
    model, _, _ = load_for_inference(run_dir)
    trained = consolidate_zero3(ckpt / "engine")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())

    # the same weights cut for two ranks as DeepSpeed does it: every parameter padded to an even
    # length and halved, in param_shapes order (the interleaving a one-rank file cannot show)
    two = tmp_path / "two"
    (two / "engine").mkdir(parents=True)
    ms = load_checkpoint_file(ckpt / "engine" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    opt = load_checkpoint_file(ckpt / "engine" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    flat = torch.cat([g.reshape(-1) for g in opt["optimizer_state_dict"]["fp32_flat_groups"]])

    def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        part = -(-x.numel() // 2)
        padded = torch.cat([x.reshape(-1), x.new_zeros(2 * part - x.numel())])
        return padded[:part], padded[part:]

    offset, groups = 0, [[], []]
    for group in ms["param_shapes"]:
        cut = [[], []]
        for shape in group.values():
            for r, h in enumerate(halves(flat[offset : offset + shape.numel()])):
                cut[r].append(h)
            offset += shape.numel()
        for r in range(2):
            groups[r].append(torch.cat(cut[r]))
    assert offset == flat.numel()
    for r in range(2):
        frags = {k: halves(v)[r].clone() for k, v in ms["frozen_param_fragments"].items()}
        torch.save(
            {**ms, "frozen_param_fragments": frags},
            two / "engine" / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt",
        )
        osd = {**opt["optimizer_state_dict"], "partition_count": 2, "fp32_flat_groups": groups[r]}
        torch.save(
            {**opt, "optimizer_state_dict": osd},
            two / "engine" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
        )
    same(two)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage,victim",
    [
        (0, "mp_rank_00_model_states.pt"),
        (3, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        (3, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
    ],
)
def test_crafted_engine_file_is_refused_by_eval_and_predict(runs, tmp_path, capsys, stage, victim):
    _, run_dir = runs[0][stage]
    run = _copy_run(run_dir, tmp_path / "run")
    target = run / "checkpoints" / "epoch_0001" / "engine" / victim
    marker = tmp_path / "marker"
    from sst_dist.train.ckpt_files import load_checkpoint_file

    torch.save({**load_checkpoint_file(target), "extra": Payload(marker)}, target)
    image = sorted((runs[1] / "data" / "raw-synthetic" / "test").glob("*.jpg"))[0]
    capsys.readouterr()
    for argv in (["eval", str(run), "--out", str(tmp_path / "ev")], ["predict", str(run), str(image)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(target) in err and "--trust-checkpoint" in err, err
        assert not marker.exists()
    # the payload is live: trusting the file runs it (and then evaluates normally)
    assert main(["eval", str(run), "--out", str(tmp_path / "ev"), "--trust-checkpoint"]) == 0
    assert marker.read_text() == "pwned"


@pytest.mark.slow
def test_pointer_leaving_its_run_is_refused(runs, tmp_path, capsys):
    _, run_dir = runs[0][0]
    run = _copy_run(run_dir, tmp_path / "run")
    outside = tmp_path / "outside" / "epoch_0001"
    shutil.copytree(run / "checkpoints" / "epoch_0001", outside)
    for text in ("../../outside/epoch_0001", str(outside)):
        (run / "checkpoints" / "best").write_text(text + "\n")
        (run / "checkpoints" / "latest").write_text(text + "\n")
        for source in (run, run / "checkpoints" / "best"):
            assert main(["eval", str(source), "--out", str(tmp_path / "ev")]) == 2
            err = capsys.readouterr().err
            assert "pointer file" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_saved_model_config_wins_and_pretrained_weights_are_never_read(runs, tmp_path, capsys):
    tr, run_dir = runs[0][0]
    # time_steps is not in the weights: changing it would silently change every score
    assert main(["eval", str(run_dir), "model.time_steps=3", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "model.time_steps=3" in err and "model.time_steps=2" in err and len(err.strip().splitlines()) == 1
    # weights the checkpoint replaces are not loaded (a missing file here; a download offline)
    missing = tmp_path / "no" / "resnet18-imagenet.pth"
    assert main(["eval", str(run_dir), f"model.pretrained={missing}", "--out", str(tmp_path / "b")]) == 0
    trained = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [r for r in trained if r["kind"] == "eval"][-1]["mAP"]
    assert _last_json(capsys.readouterr().out)["mAP"] == pytest.approx(want, abs=1e-6)


@pytest.mark.slow
def test_predict_uses_the_eval_transform_and_survives_bad_images(runs, tmp_path, capsys):
    from data_shards.loaders import build_loader
    from sst_dist.train.evaluate import gather_scores

    tr, run_dir = runs[0][0]
    data = runs[1] / "data"
    good = sorted((data / "raw-synthetic" / "test").glob("*.jpg"))[:3]
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(good[0].read_bytes()[:100])
    bomb = tmp_path / "bomb.png"  # over PIL's warning limit, under its error limit: a warning only
    Image.new("1", (9500, 9500)).save(bomb)
    # EXIF orientation 6 (rotate 90 clockwise to view): the same picture as the upright file
    upright = Image.open(good[1]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "rotated.png"
    upright.transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif)
    upright_copy = tmp_path / "upright.png"
    upright.save(upright_copy)
    images = [good[0], bad, good[1], bomb, good[2], rotated, upright_copy]
    capsys.readouterr()
    assert main(["predict", str(run_dir), *map(str, images), "--batch-size", "2"]) == 2
    out, err = capsys.readouterr()
    rows = {r["image"]: r for r in map(json.loads, out.splitlines())}
    assert list(rows) == [str(p) for p in images if p not in (bad, bomb)]
    assert str(bad) in err and str(bomb) in err and "2 of 7 images" in err
    assert rows[str(rotated)]["scores"] == rows[str(upright_copy)]["scores"]

    # the loaders' eval pipeline on the same files (the shards hold their bytes) gives the same scores
    cfg = tr.cfg
    loader = build_loader(
        data,
        "test",
        train=False,
        batch_size=4,
        image_size=cfg.data.image_size,
        proportion=cfg.data.proportion,
        num_workers=0,
        backend="torch",
    )
    model = tr.model
    _, logits, _ = gather_scores(model, loader, torch.device("cpu"), torch.float32)
    names = tr.data.class_names
    for i, p in enumerate(good):
        got = np.array([rows[str(p)]["scores"][n] for n in names])
        np.testing.assert_allclose(got, 1 / (1 + np.exp(-logits[i])), atol=2e-6)
