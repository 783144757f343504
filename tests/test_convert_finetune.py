"""An official SST checkpoint, once converted, starts training and evaluation here exactly."""

import json
import os
from pathlib import Path

import pytest
import torch
from test_convert import C, D, E, F, H, reference_state_dict

from sst_dist.cli import main as cli_main
from sst_dist.config import ConfigError, load_config

DEBUG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "debug.yaml"


def overrides(tmp: Path, converted: Path) -> list[str]:
    return [
        f"model.num_classes={C}", f"data.synthetic.num_classes={C}", f"model.feature_dim={F}",
        f"model.inter_dim={H}", f"model.out_dim={D}", f"model.embed_dim={E}", "model.time_steps=3",
        f"data.root={tmp / 'data'}", f"output.root={tmp / 'runs'}", "output.tensorboard=false",
        "train.epochs=1", "train.max_steps_per_epoch=2", f"train.init_from={converted}",
    ]


@pytest.fixture(autouse=True)
def cpu_deepspeed_env():
    """The trainer exports RANK/MASTER_PORT/... into os.environ: restore it afterwards, or later
    tests' subprocesses (sbatch exports the environment) would reuse this process's port."""
    saved = dict(os.environ)
    os.environ["DS_ACCELERATOR"] = "cpu"
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_converted_checkpoint_initializes_finetuning_and_evaluates(tmp_path, capsys):
    from sst_dist.train.trainer import Trainer

    src, converted = tmp_path / "official.pth", tmp_path / "sst.pt"
    torch.save({"state_dict": reference_state_dict(), "epoch": 3}, src)
    assert cli_main(["convert-checkpoint", str(src), str(converted)]) == 0
    want = torch.load(converted, weights_only=True)["model"]

    # the converted trunk replaces the pretrained one, so model.pretrained is never read: an
    # unreadable file there (or a name that would need a download) must not stop the run
    bogus = tmp_path / "trunk.pth"
    bogus.write_bytes(b"not a state dict")
    trainer = Trainer(load_config(DEBUG, [*overrides(tmp_path, converted), f"model.pretrained={bogus}"]))
    got = trainer.model.state_dict()
    for k, v in want.items():
        if not k.startswith("bank."):
            assert torch.equal(got[k].to(v.dtype), v), k
    trainer.train()  # fine-tuning runs from the imported weights
    assert not torch.equal(trainer.model.state_dict()["classifier.weight"], want["classifier.weight"])

    args = ["eval", str(converted), *overrides(tmp_path, converted), "--config", str(DEBUG)]
    assert cli_main(args) == 0
    res = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1])
    assert 0 <= res["mAP"] <= 1 and res["checkpoint"] == str(converted)
    assert cli_main(["eval", str(converted)]) == 2  # a file needs --config


def test_init_from_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config(DEBUG, [f"train.init_from={tmp_path / 'missing.pt'}"])
    assert not os.path.exists(tmp_path / "missing.pt")


def test_converted_file_in_eval_and_predict_keeps_its_own_model(tmp_path, capsys):
    """predict takes the file alone; eval never reads pretrained weights it would overwrite, and a
    run config disagreeing with the file's model (time_steps is in no weight) is refused."""
    from PIL import Image

    from data_shards.images import open_rgb
    from data_shards.loaders.augment import eval_tensor
    from sst_dist.convert import build_model, convert_reference_checkpoint
    from sst_dist.train.data import ensure_synthetic

    src, converted = tmp_path / "official.pth", tmp_path / "sst.pt"
    torch.save({"state_dict": reference_state_dict(), "epoch": 3}, src)
    assert cli_main(["convert-checkpoint", str(src), str(converted)]) == 0
    images = []
    for i, color in enumerate(((200, 30, 30), (20, 180, 240))):
        images.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (90, 70), color).save(images[-1])
    capsys.readouterr()
    assert cli_main(["predict", str(converted), *map(str, images)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    reference = build_model(*convert_reference_checkpoint(src)).eval()
    with torch.no_grad():
        want = torch.sigmoid(reference(torch.stack([eval_tensor(open_rgb(p), 448) for p in images])).logits)
    for row, w in zip(rows, want):
        assert [row["scores"][f"class_{c}"] for c in range(C)] == pytest.approx(w.tolist(), abs=1e-6)

    ov = overrides(tmp_path, converted)
    ensure_synthetic(load_config(DEBUG, ov))
    missing = tmp_path / "offline" / "resnet18-imagenet.pth"
    opts = ["--config", str(DEBUG), "--out", str(tmp_path / "ev")]
    assert cli_main(["eval", str(converted), *ov, f"model.pretrained={missing}", *opts]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["num_samples"] == 16
    assert cli_main(["eval", str(converted), *ov, "model.time_steps=2", *opts]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.time_steps=2" in err and "model.time_steps=3" in err and len(err.splitlines()) == 1
