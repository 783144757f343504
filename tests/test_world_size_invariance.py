"""2 ranks x batch 4 train exactly like 1 rank x batch 8 on the same 8 samples (fp32, CPU, gloo).

Each configuration runs in real processes started from this file (``python THIS --worker``) with
RANK/WORLD_SIZE/MASTER_* set as a launcher would, building the DeepSpeed Trainer on the CPU
accelerator. Every rank writes the memory bank, pseudo labels, loss, its own first-step gradients
(as DeepSpeed's all-reduce left them, so a missing synchronisation shows) and its weights/bank
after each of two steps. Images are 128 px, so the feature map is 2x2 (S = 4) and the semantic
decoupling's softmax and label embeddings train; weights are compared far below one Adam step.

Batch norm: both BatchNorm modes run. ``trunk_bn=train`` is the reference recipe (the default):
layer4's and the neck's BatchNorms train and, with world 2, synchronise through this project's
CPU path (``train.batchnorm=sync`` -> ``AllReduceBatchNorm``: a differentiable all-reduce of
per-channel count/sum/sum of squares); ``trunk_bn=frozen`` keeps the trunk's in eval mode.
(On 2026-12-02 this test was run with the trunk frozen only, after a divergence at step 2 in
the recipe's mode; it did not reproduce on 2026-12-03 with the same code: the weights that
differed were the few whose first Adam step is noise-dominated, which the mask below excludes.)
A second test checks AllReduceBatchNorm alone against a float64 BatchNorm over the full batch,
outputs and gradients.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from launch_support import run_rank_processes

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
GLOBAL_B, C, SIZE, LR = 8, 5, 128, 1e-3  # 128 px: a 2x2 feature map (S = 4)


def _run_workers(mode: str, world: int, out: Path) -> None:
    run_rank_processes([str(HERE), "--worker", mode, str(out)], world, out, mode.replace(":", "-"))


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.double().abs().max().item() if b.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max abs difference {err:.3e} (scale {scale:.3e})"


# exactly zero by design: k = w4.b3 + b4 shifts every score of a row and cancels in the softmax
ZERO_GRAD_BY_DESIGN = {"decoupling.fc3.bias", "decoupling.fc4.bias"}


def _grads_match(got: dict, ref: dict, who: str, rel: float = 5e-5) -> None:
    """Per tensor, max |got - ref| <= rel * max |ref| (float32 summation order differs by world)."""
    assert got.keys() == ref.keys(), f"{who}: gradient sets differ"
    for name, g in ref.items():
        err = (got[name].double() - g.double()).abs().max().item()
        assert err <= rel * g.abs().max().item() + 1e-12, f"{who}: gradient of {name} off by {err:.3e}"


def _weights_match(got: dict, ref: dict, mask: dict, tol: float, what: str) -> None:
    for name, m in mask.items():
        err = (got[name] - ref[name]).abs()[m].max().item()
        assert err <= tol, f"{what}: {name} differs by {err:.3e} (> {tol:.0e}, a step is {LR:.0e})"


@pytest.mark.slow
@pytest.mark.parametrize("trunk_bn", ["train", "frozen"])
def test_two_ranks_match_one_rank(tmp_path, trunk_bn):
    _run_workers(f"train:{trunk_bn}", 2, tmp_path)
    _run_workers(f"train:{trunk_bn}", 1, tmp_path)
    ranks = [torch.load(tmp_path / f"train-world2-rank{r}.pt", weights_only=False) for r in (0, 1)]
    two, one = ranks[0], torch.load(tmp_path / "train-world1-rank0.pt", weights_only=False)
    # resnet18 layer4: 2 BasicBlocks x 2 BNs + the downsample BN, and the neck
    assert one["bns_training"] == two["bns_training"] == (6 if trunk_bn == "train" else 1)
    # 128 px gives a 2x2 map: the decoupling softmax really chooses among positions
    assert one["positions"] == two["positions"] == 4
    # the trainable BNs in training mode are synchronized (with world 1 it is plain BatchNorm2d math)
    assert two["bn_types"] == one["bn_types"] == ["AllReduceBatchNorm"]
    for key in ("intra", "inter"):
        assert torch.equal(two["pseudo"][key], one["pseudo"][key]), f"{key} pseudo labels differ"
    # the test is only meaningful if pseudo labels and the contrastive subsampling really ran
    assert (two["pseudo"]["intra"] != two["labels"]).any() and (two["pseudo"]["inter"] != two["labels"]).any()
    assert two["terms"].keys() == one["terms"].keys() == {"bce", "intra", "inter", "cooc", "contrastive"}
    for k in one["terms"]:
        _close(torch.tensor(two["terms"][k]), torch.tensor(one["terms"][k]), f"loss term {k}")
    _close(torch.tensor(two["loss"]), torch.tensor(one["loss"]), "global loss")
    _close(two["bank1"], one["bank1"], "bank after step 1")

    # every trainable parameter gets a gradient, nonzero except the two the softmax cancels
    assert set(one["grads"]) == set(one["trainable"])
    zero = {n for n, g in one["grads"].items() if not g.abs().max() > 0}
    assert zero == ZERO_GRAD_BY_DESIGN, f"parameters without gradient: {sorted(zero - ZERO_GRAD_BY_DESIGN)}"
    # each rank's own gradients straight after backward (DeepSpeed's all-reduce, nothing added by the
    # test) are the global-batch gradients, and bit-identical across ranks
    for r, rec in enumerate(ranks):
        _grads_match(rec["grads"], one["grads"], f"world 2 rank {r}")
    for key in ("grads", "weights1", "weights2"):
        for name in ranks[0][key]:
            assert torch.equal(ranks[0][key][name], ranks[1][key][name]), f"ranks disagree on {key} {name}"

    # Adam's first step moves w by lr * g'/(|g'| + 1e-8), g' = g + wd*w. Where |g'| < 1e-6 float
    # noise in g (~1e-8) changes that step visibly (a weight-decay/gradient cancellation); elsewhere
    # the step is exact to rounding. Compare there, far below one step (lr = 1e-3).
    wd = one["weight_decay"]
    eff = {n: (one["grads"][n] + wd * one["weights0"][n]).abs() for n in one["trainable"]}
    mask = {n: e >= 1e-6 for n, e in eff.items()}
    kept = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    # measured: 0.998 with the recipe's BNs training, 0.978 with the trunk's frozen
    least = 0.99 if trunk_bn == "train" else 0.97
    assert kept > least, f"only {kept:.3f} of the weights have a clear first step"
    for name, m in mask.items():
        moved = (one["weights1"][name] - one["weights0"][name]).abs()[m]
        assert moved.numel() == 0 or moved.min() > 0.9 * LR, f"{name} did not take its Adam step"
    _weights_match(two["weights1"], one["weights1"], mask, 1e-6, "weights after step 1")
    # step 2 also sees step 1's few noise-dominated weights (up to ~3e-4 off) in its forward pass
    _weights_match(two["weights2"], one["weights2"], mask, 2e-5, "weights after step 2")
    _close(two["bank2"], one["bank2"], "bank after step 2", tol=1e-4)


@pytest.mark.slow
def test_allreduce_batchnorm_matches_full_batch_float64(tmp_path):
    _run_workers("bn", 2, tmp_path)
    got = torch.load(tmp_path / "bn-world2.pt", weights_only=False)
    torch.manual_seed(5)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    y = bn(x)
    (y * w).sum().backward()
    _close(got["y"], y.detach(), "normalized output", 1e-5)
    _close(got["x_grad"], x.grad, "input gradient", 1e-5)
    _close(got["w_grad"], bn.weight.grad, "weight gradient", 1e-5)
    _close(got["b_grad"], bn.bias.grad, "bias gradient", 1e-5)
    _close(got["running_mean"], bn.running_mean, "running mean", 1e-5)
    _close(got["running_var"], bn.running_var, "running var", 1e-5)


# ---------------------------------------------------------------------------------- workers
def _global_batch():
    from data_shards.loaders import Batch

    g = torch.Generator().manual_seed(1234)
    images = torch.randn(2, GLOBAL_B, 3, SIZE, SIZE, generator=g)
    # the second half is a noisy copy of the first: an image on rank 1 then finds its twin's known
    # positives (pushed by rank 0) in the bank, so inter-image pseudo labels really depend on the
    # gathering. Not an exact copy: with identical halves, per-rank BatchNorm statistics equal the
    # global ones and their gradients sum to the same, so a missing BN synchronisation passed.
    half = GLOBAL_B // 2
    images[:, half:] = images[:, :half] + 0.3 * torch.randn(2, half, 3, SIZE, SIZE, generator=g)
    full = torch.where(torch.rand(2, GLOBAL_B, C, generator=g) < 0.4, 1, -1).to(torch.int8)
    known = torch.rand(2, GLOBAL_B, C, generator=g) < 0.6
    partial = (full * known).to(torch.int8)
    index = torch.arange(2 * GLOBAL_B).view(2, GLOBAL_B)
    return [Batch(images[s], partial[s], full[s], index[s]) for s in range(2)]


def _slice(batch, rank: int, world: int):
    per = GLOBAL_B // world
    return type(batch)(*(t[rank * per : (rank + 1) * per] for t in batch))


def _train_worker(out: Path, trunk_bn: str) -> None:
    """Train 2 steps; every rank saves its own gradients (straight after backward, no test-side
    reduction) and weights/bank after each step."""
    from sst_dist.config import config_from_dict
    from sst_dist.model.adjacency import cooccurrence_adjacency
    from sst_dist.train import distributed as D
    from sst_dist.train.trainer import RunData, Trainer

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    steps = _global_batch()
    local = [_slice(b, rank, world) for b in steps]
    adjacency = cooccurrence_adjacency(torch.cat([b.partial for b in steps]))
    cfg = config_from_dict(
        {
            "model": {
                "num_classes": C,
                "backbone": "resnet18",
                "feature_dim": 32,
                "inter_dim": 16,
                "out_dim": 32,
                "embed_dim": 8,
                "time_steps": 2,
                "bank_size": 2,
                "impl": "fused",
                "trunk_bn": trunk_bn,
            },
            "loss": {"ramp_epochs": 0},
            "pseudo": {"warmup_epochs": 0, "margin_start": 0.2, "margin_min": 0.2},
            "train": {"batch_size": GLOBAL_B // world, "lr": LR, "progress": False, "batchnorm": "sync"},
            "output": {"root": str(out), "name": f"w{world}", "tensorboard": False},
        }
    )
    data = RunData(local, local, adjacency, [f"c{i}" for i in range(C)])
    tr = Trainer(cfg, data=data)
    weights0 = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr._set_train_mode()
    tr.sst.set_epoch(0)
    seen = []  # the feature map's shape, caught on the way (a second forward would move BN stats)
    hook = tr.model.backbone.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    res = tr.forward_loss(local[0], 0, 0.0)
    hook.remove()
    pseudo = {k: D.all_gather_rows(v, keep_local_grad=False) for k, v in tr.sst.last_pseudo.items()}
    bank1 = tr.model.bank.bank.detach().clone()
    tr.engine.backward(res.loss)
    # this rank's gradients as DeepSpeed left them: a missing all-reduce shows here
    grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    trainable = sorted(n for n, p in tr.model.named_parameters() if p.requires_grad)
    tr.engine.step()
    weights1 = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train_step(local[1], 0, 0.5)
    print("pseudo changes", {k: int((v != steps[0].partial.float()).sum()) for k, v in pseudo.items()})
    record = {
        "positions": seen[0][1],
        "bn_types": sorted(
            {
                type(m).__name__
                for m in tr.model.modules()
                if isinstance(m, torch.nn.BatchNorm2d) and m.training
            }
        ),
        "bns_training": sum(isinstance(m, torch.nn.BatchNorm2d) and m.training for m in tr.model.modules()),
        "pseudo": pseudo,
        "labels": steps[0].partial.float(),
        "terms": res.terms,
        "loss": res.global_loss,
        "bank1": bank1,
        "bank2": tr.model.bank.bank.detach().clone(),
        "grads": grads,
        "trainable": trainable,
        "weight_decay": cfg.train.weight_decay,
        "weights0": weights0,
        "weights1": weights1,
        "weights2": {n: p.detach().clone() for n, p in tr.model.named_parameters()},
    }
    torch.save(record, out / f"train-world{world}-rank{rank}.pt")
    D.barrier()


def _bn_worker(out: Path) -> None:
    from sst_dist.train import distributed as D

    D.init_distributed()
    rank, world = D.rank(), D.world_size()
    torch.manual_seed(5)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64).float()
    w = torch.randn(6, 3, 4, 5, dtype=torch.float64).float()
    rows = slice(rank * 3, (rank + 1) * 3)
    bn = D.AllReduceBatchNorm(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    xl = x[rows].clone().requires_grad_(True)
    y = bn(xl)
    (y * w[rows]).sum().backward()
    rec = {
        "y": D.all_gather_rows(y.detach()),
        "x_grad": D.all_gather_rows(xl.grad),
        "w_grad": D.all_reduce_sum(bn.weight.grad),
        "b_grad": D.all_reduce_sum(bn.bias.grad),
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
    }
    if rank == 0:
        torch.save(rec, out / f"bn-world{world}.pt")
    D.barrier()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.path.insert(0, str(ROOT))
    mode, *options = sys.argv[2].split(":")
    {"train": _train_worker, "bn": _bn_worker}[mode](Path(sys.argv[3]), *options)
