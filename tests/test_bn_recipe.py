"""The reference's BatchNorm recipe: modes, outputs and running statistics as its Train() gives them,
and world-size invariance with layer4's BatchNorms training (2 ranks x 4 = 1 rank x 8).

The reference (HCP-MLR-PL SST) calls ``model.train(); model.backbone.eval();
model.backbone.layer4.train()``. The single-process tests rebuild that module tree around a
torchvision ResNet-18 with the same weights, apply those three calls literally, and compare.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn
import torchvision
from launch_support import run_rank_processes

from sst_dist.model.backbone import Backbone
from sst_dist.model.config import ModelConfig
from sst_dist.train import distributed as D

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
GLOBAL_B, C, SIZE = 8, 5, 128  # 128 px: layer4 maps of 4x4, a 2x2 feature map after the pool


def _bns(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class _Reference(nn.Module):
    """The reference's layout: ``backbone`` (a whole torchvision ResNet) and ``changeChannel``."""

    def __init__(self, ours: Backbone) -> None:
        super().__init__()
        self.backbone = torchvision.models.resnet18(weights=None)
        self.backbone.load_state_dict({**self.backbone.state_dict(), **ours.trunk.state_dict()})
        self.changeChannel = nn.Sequential(copy.deepcopy(ours.reduce), copy.deepcopy(ours.reduce_bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
        x = self.changeChannel(Fn.avg_pool2d(x, 2, 2))
        return x.flatten(2).transpose(1, 2)

    def reference_train(self) -> None:
        self.train()
        self.backbone.eval()
        self.backbone.layer4.train()


def _ours_to_reference_name(name: str) -> str:
    return name.replace("trunk.", "backbone.", 1).replace("reduce_bn", "changeChannel.1")


def test_modes_outputs_and_running_stats_match_the_reference():
    torch.manual_seed(0)
    ours = Backbone("resnet18", feature_dim=16, freeze="layer4")
    with torch.no_grad():  # non-trivial running statistics everywhere, as in an ImageNet trunk
        for bn in _bns(ours).values():
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    ref = _Reference(ours)
    ours.train()
    ref.reference_train()
    training = {_ours_to_reference_name(n) for n, m in _bns(ours).items() if m.training}
    assert training == {n for n, m in _bns(ref).items() if m.training}
    assert any(n.startswith("backbone.layer4.") for n in training) and "changeChannel.1" in training
    assert not any(n.startswith(("backbone.layer3.", "backbone.bn1")) for n in training)

    start = {n: m.running_mean.clone() for n, m in _bns(ours).items()}
    for step in range(2):  # training-mode forwards: batch statistics, running stats move
        x = torch.randn(GLOBAL_B, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(step))
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    ref_bns = _bns(ref)
    for n, m in _bns(ours).items():
        r = ref_bns[_ours_to_reference_name(n)]
        torch.testing.assert_close(m.running_mean, r.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, r.running_var, rtol=1e-5, atol=1e-6)
        moved = not torch.equal(m.running_mean, start[n])
        assert moved == (n.startswith("trunk.layer4.") or n == "reduce_bn"), n
    ours.eval()
    ref.eval()
    x = torch.randn(3, 3, SIZE, SIZE)  # test time: the updated running statistics
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_frozen_variant_and_full_finetuning():
    frozen = Backbone("resnet18", feature_dim=8, freeze="layer4", trunk_bn="frozen").train()
    assert {n for n, m in _bns(frozen).items() if m.training} == {"reduce_bn"}
    assert frozen.trunk.layer4[0].conv1.weight.requires_grad  # weights still train
    everything = Backbone("resnet18", feature_dim=8, freeze="none").train()
    assert all(m.training for m in _bns(everything).values())
    with pytest.raises(ValueError, match="trunk_bn"):
        ModelConfig(num_classes=3, trunk_bn="local")


def test_model_level_train_and_trainer_conversion_apply_the_recipe():
    """SSTModel.train() (what DeepSpeed's engine.train() calls) applies the recipe; the trainer's
    ``convert_batchnorm(model, "sync")`` makes exactly the training BNs synchronised ones."""
    from sst_dist.model.sst import SSTModel

    cfg = ModelConfig(num_classes=C, backbone="resnet18", feature_dim=16, inter_dim=8, out_dim=16,
                      embed_dim=4, time_steps=1, bank_size=2, impl="fused")
    model = SSTModel(cfg, torch.eye(C))
    D.convert_batchnorm(model, "sync")
    model.train()
    training = {n for n, m in _bns(model).items() if m.training}
    layer4 = {n for n in _bns(model) if n.startswith("backbone.trunk.layer4.")}
    assert training == layer4 | {"backbone.reduce_bn"}
    assert all(type(_bns(model)[n]) is D.AllReduceBatchNorm for n in training)
    assert all(type(m) is nn.BatchNorm2d for n, m in _bns(model).items() if n not in training)
    model.eval()
    assert not any(m.training for m in _bns(model).values())
    model.train()
    D.freeze_batchnorm_stats(model)  # train.batchnorm=frozen: every BN in eval mode
    assert not any(m.training for m in _bns(model).values())


# ------------------------------------------------------------------------ world-size invariance
def _run_ranks(world: int, out: Path) -> None:
    run_rank_processes([str(HERE), "--worker", str(out)], world, out, "bn-recipe")


@pytest.mark.slow
def test_layer4_bn_two_ranks_match_one_rank(tmp_path):
    _run_ranks(2, tmp_path)
    _run_ranks(1, tmp_path)
    two, one = (torch.load(tmp_path / f"bn-recipe-world{w}.pt", weights_only=True) for w in (2, 1))
    assert two["training"] == one["training"]
    assert any(".layer4." in n for n in one["training"]) and "backbone.reduce_bn" in one["training"]
    assert set(two["types"]) == {"AllReduceBatchNorm"}  # synchronised across the 2 ranks
    for key, tol in (("stats1", 1e-5), ("grads1", 1e-5), ("stats2", 5e-3), ("eval_logits", 5e-3)):
        assert two[key].keys() == one[key].keys() and one[key], key
        for name, ref in one[key].items():
            got = two[key][name]
            scale = max(1.0, ref.abs().max().item())
            err = (got.double() - ref.double()).abs().max().item()
            assert err <= tol * scale, f"{key} {name}: 2x4 vs 1x8 differ by {err:.3e}"
    moved = [n for n, v in one["stats1"].items() if not torch.equal(v, one["stats0"][n])]
    assert moved and all(".layer4." in n or "reduce_bn" in n for n in moved)
    assert any(".layer3." in n for n in one["stats0"])  # frozen stages were recorded, and stayed put


def _worker(out: Path) -> None:
    from data_shards.loaders import Batch
    from sst_dist.config import config_from_dict
    from sst_dist.model.adjacency import cooccurrence_adjacency
    from sst_dist.train.trainer import RunData, Trainer

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    g = torch.Generator().manual_seed(7)
    images = torch.randn(2, GLOBAL_B, 3, SIZE, SIZE, generator=g)
    full = torch.where(torch.rand(2, GLOBAL_B, C, generator=g) < 0.4, 1, -1).to(torch.int8)
    partial = (full * (torch.rand(2, GLOBAL_B, C, generator=g) < 0.6)).to(torch.int8)
    steps = [Batch(images[s], partial[s], full[s], torch.arange(GLOBAL_B) + s * GLOBAL_B) for s in range(2)]
    per = GLOBAL_B // world
    local = [type(b)(*(t[rank * per : (rank + 1) * per] for t in b)) for b in steps]
    model = {"num_classes": C, "backbone": "resnet18", "freeze": "layer4", "trunk_bn": "train",
             "feature_dim": 16, "inter_dim": 8, "out_dim": 16, "embed_dim": 4, "time_steps": 1,
             "bank_size": 2, "impl": "fused"}
    cfg = config_from_dict({
        "model": model, "loss": {"ramp_epochs": 0}, "pseudo": {"warmup_epochs": 0},
        "train": {"batch_size": per, "lr": 1e-3, "progress": False, "batchnorm": "sync"},
        "output": {"root": str(out), "name": f"w{world}", "tensorboard": False},
    })
    adjacency = cooccurrence_adjacency(partial.flatten(0, 1))
    tr = Trainer(cfg, data=RunData(local, local, adjacency, list("abcde")))
    bns = {n: m for n, m in tr.model.named_modules() if isinstance(m, nn.BatchNorm2d)}

    def stats() -> dict[str, torch.Tensor]:
        return {n: torch.cat([m.running_mean, m.running_var]).clone() for n, m in bns.items()}

    stats0 = stats()
    tr._set_train_mode()
    training = sorted(n for n, m in bns.items() if m.training)
    tr.sst.set_epoch(0)
    res = tr.forward_loss(local[0], 0, 0.0)
    stats1 = stats()
    tr.engine.backward(res.loss)
    grads1 = {n: D.all_reduce_sum(p.grad) / world for n, p in tr.model.named_parameters()
              if p.grad is not None and ("bn" in n or "downsample.1" in n)}
    tr.engine.step()
    tr.train_step(local[1], 0, 0.5)
    tr.engine.eval()
    with torch.no_grad():
        eval_logits = tr.model(images.flatten(0, 1)).logits
    record = {
        "training": training,
        "types": sorted({type(bns[n]).__name__ for n in training}),
        "stats0": stats0, "stats1": stats1, "stats2": stats(), "grads1": grads1,
        "eval_logits": {"all": eval_logits},
    }
    if rank == 0:
        torch.save(record, out / f"bn-recipe-world{world}.pt")
    D.barrier()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[2]))
