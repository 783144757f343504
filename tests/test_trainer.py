"""The Trainer end to end in one process (DeepSpeed on the CPU accelerator, debug config).

One module-scoped run trains the debug config (synthetic scenes, resnet18, 2 epochs, pseudo
labels from epoch 1) and the tests check what it leaves behind, that its loss is the plain
single-process SST loss, the NaN skip/abort policy, the damaged-checkpoint fallback and the
eval/predict commands on its checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from sst_dist import losses as L
from sst_dist.config import load_config
from sst_dist.pseudo import intra_pseudo_labels

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "launch" / "configs" / "debug.yaml"


# exactly zero by design: k = w4.b3 + b4 shifts every score of a row and cancels in the softmax
ZERO_GRAD_BY_DESIGN = {"decoupling.fc3.bias", "decoupling.fc4.bias"}


@dataclass
class Run:
    """The module's finished run: read-only facts, recorded before any test ran."""

    cfg: Any
    run_dir: Path
    tmp: Path
    summary: dict
    global_step: int
    steps_per_epoch: int
    bank_filled: int
    class_names: list[str]
    bank: torch.Tensor


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from sst_dist.train.trainer import Trainer

    saved = dict(os.environ)
    os.environ["DS_ACCELERATOR"] = "cpu"
    tmp = tmp_path_factory.mktemp("trainer")
    cfg = load_config(
        DEBUG,
        [
            f"output.root={tmp / 'runs'}",
            f"data.root={tmp / 'data'}",
            "output.tensorboard=true",
            "pseudo.margin_start=0.3",
            "pseudo.margin_min=0.3",
        ],
    )
    trainer = Trainer(cfg)
    summary = trainer.train()
    yield Run(copy.deepcopy(cfg), trainer.run_dir, tmp, summary, trainer.global_step, trainer.steps_per_epoch,
              int(trainer.model.bank.filled.sum()), list(trainer.data.class_names),
              trainer.model.bank.bank.detach().clone())
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def fresh(run, tmp_path):
    """A new Trainer resumed from a private copy of the finished run: a test may train, poison or
    damage it without changing what any other test sees (tests pass in any order)."""
    from sst_dist.train.trainer import Trainer

    def make(*overrides: str) -> Trainer:
        shutil.copytree(run.run_dir, tmp_path / "runs" / run.run_dir.name)
        cfg = load_config(
            run.run_dir / "config.yaml", [f"output.root={tmp_path / 'runs'}", *overrides]
        )
        return Trainer(cfg, resume=True)

    made: list = []
    yield lambda *o: made.append(make(*o)) or made[-1]
    for tr in made:
        tr.release()


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_leaves_config_metrics_eval_and_checkpoints(run):
    rd = run.run_dir
    assert load_config(rd / "config.yaml") == run.cfg
    recs = _records(rd)
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    train = [r for r in recs if r["kind"] == "train"]
    for key in ("loss", "loss_bce", "loss_cooc", "loss_contrastive", "lr", "images_per_s", "margin_intra"):
        assert all(key in r for r in train), key
    late = [r for r in train if r["epoch"] == 1]
    assert late and all("loss_intra" in r and "loss_inter" in r and "inter_precision" in r for r in late)
    assert not any("loss_intra" in r for r in train if r["epoch"] == 0)  # warm-up: no pseudo terms
    assert epochs[1]["intra_count"] > 0 and epochs[1]["inter_count"] > 0  # low margin: pseudo labels appear
    assert 0.0 <= epochs[1]["intra_precision"] <= 1.0 and 0.0 <= epochs[1]["intra_recall"] <= 1.0
    evals = [r for r in recs if r["kind"] == "eval"]
    assert len(evals) == 2 and all(0.0 <= r["mAP"] <= 1.0 for r in evals)
    assert run.summary["mAP"] == pytest.approx(evals[-1]["mAP"])
    ap = json.loads((rd / "eval" / "ap_epoch_0002.json").read_text())
    assert len(ap["ap"]) == 6 and (rd / "eval" / "ap_epoch_0002.png").stat().st_size > 1000
    assert list((rd / "tensorboard").glob("events.*"))
    ck = rd / "checkpoints"
    assert (ck / "latest").read_text().strip() == "epoch_0002"
    meta = json.loads((ck / "epoch_0002" / "meta.json").read_text())
    assert meta["epoch"] == 2 and meta["step"] == run.global_step == 2 * run.steps_per_epoch
    assert (ck / "best").read_text().strip() in ("epoch_0001", "epoch_0002")
    assert run.bank_filled > 0


@pytest.mark.slow
def test_every_trainable_parameter_gets_gradient_at_s_above_one(fresh):
    """At the debug size the feature map has S > 1 positions, so one pseudo-label step sends a
    nonzero gradient to every trainable parameter (decoupling softmax and label embeddings
    included), except the two biases the softmax cancels exactly."""
    tr = fresh()
    batch = next(iter(tr.data.train_loader))
    seen = []
    hook = tr.model.backbone.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    tr._set_train_mode()
    tr.sst.set_epoch(1)
    tr.engine.zero_grad()
    res = tr.forward_loss(batch, 1, 0.5)
    hook.remove()
    tr.engine.backward(res.loss)
    assert seen[0][1] > 1, f"feature map {seen[0]}: S = 1 leaves the decoupling softmax untrained"
    assert "intra" in res.terms and "inter" in res.terms
    trainable = {n: p for n, p in tr.model.named_parameters() if p.requires_grad}
    assert "label_embeddings" in trainable and "decoupling.fc1.weight" in trainable
    none = sorted(n for n, p in trainable.items() if p.grad is None)
    zero = {n for n, p in trainable.items() if p.grad is not None and not p.grad.abs().max() > 0}
    assert not none, f"no gradient: {none}"
    assert zero == ZERO_GRAD_BY_DESIGN, f"zero gradient: {sorted(zero - ZERO_GRAD_BY_DESIGN)}"


@pytest.mark.slow
def test_step_loss_is_the_single_process_sst_loss(fresh):
    """World 1: compute() must equal the sum of the losses-module terms built by hand."""
    tr = fresh()
    batch = next(iter(tr.data.train_loader))
    labels = batch.partial.float()
    assert (labels == 1).any(), "the batch must push positives into the bank"
    tr._set_train_mode()
    epoch, progress = 1, 0.25
    tr.sst.set_epoch(epoch)
    # copies, not the live buffers: forward_loss updates the bank in place
    bank_before = {k: v.detach().clone() for k, v in tr.model.bank.state_dict().items()}
    gen_before = tr.sst.generator.get_state()
    with torch.no_grad():
        res = tr.forward_loss(batch, epoch, progress)
        assert not torch.equal(tr.model.bank.bank, bank_before["bank"])  # the update really happened
        # reference: same forward (BN in training mode is deterministic), the pieces composed directly
        tr.model.bank.load_state_dict(bank_before)
        gen = torch.Generator().set_state(gen_before)
        out = tr.model(batch.images)
        tr.model.bank.update(out.features, labels)
        margin = tr.sst.schedule.margin(epoch)
        intra = intra_pseudo_labels(out.pair_logits, labels, margin)
        _, inter = tr.model.bank.pseudo_labels(out.features, labels, margin)
        w = L.LossWeights(tr.cfg.loss, tr.cfg.pseudo.warmup_epochs)
        terms = L.sst_loss_terms(
            out.logits, out.pair_logits, out.features, labels, intra, inter, epoch, progress, w, generator=gen
        )
        ref = L.total_loss(terms, w.effective(epoch, progress))
    assert torch.allclose(res.loss, ref, rtol=1e-5, atol=1e-6), (res.loss, ref)
    assert res.global_loss == pytest.approx(float(ref), rel=1e-5)
    assert torch.equal(tr.sst.last_pseudo["intra"], intra) and torch.equal(tr.sst.last_pseudo["inter"], inter)


@pytest.mark.slow
def test_nan_loss_is_skipped_then_aborts_keeping_last_checkpoint(fresh):
    from sst_dist.train.trainer import TrainingAborted

    tr = fresh("train.epochs=3", "train.max_bad_steps=3")
    poison = {"left": 1}

    def hook(_module, _inp, out):
        if poison["left"] > 0:
            poison["left"] -= 1
            return out * float("nan")
        return out

    handle = tr.model.out_fc.register_forward_hook(hook)
    try:
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
        step, skipped = tr.global_step, tr.skipped_steps
        batch = next(iter(tr.data.train_loader))
        tr._set_train_mode()
        res = tr.train_step(batch, 1, 0.0)
        assert not res.finite and tr.skipped_steps == skipped + 1 and tr.global_step == step
        assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters() if p.requires_grad)
        res = tr.train_step(batch, 1, 0.0)  # healthy again: a real step, the bad-step streak resets
        assert res.finite and tr.global_step == step + 1 and tr.bad_steps == 0
        assert any(not torch.equal(p, before[n]) for n, p in tr.model.named_parameters() if p.requires_grad)

        ck = tr.checkpoints.root
        latest_before = (ck / "latest").read_text()
        files_before = sorted(p.name for p in ck.iterdir())
        poison["left"] = 10**6
        with pytest.raises(TrainingAborted, match="3 non-finite losses in a row"):
            tr.train()
        assert (ck / "latest").read_text() == latest_before
        assert sorted(p.name for p in ck.iterdir()) == files_before
    finally:
        handle.remove()


@pytest.mark.slow
def test_damaged_latest_falls_back_to_previous(run, fresh):
    tr = fresh()
    ck = tr.checkpoints.root
    assert tr.epoch == 2
    bank2 = tr.model.bank.bank.clone()
    assert torch.equal(bank2, run.bank)  # the resume restored the bank the run ended with
    state = ck / "epoch_0002" / "sst_state.pt"
    good = state.read_bytes()
    state.write_bytes(b"garbage")  # a torn write of the newest checkpoint (in this test's copy)
    assert tr.resume()
    assert tr.epoch == 1 and tr.global_step == tr.steps_per_epoch
    assert not torch.equal(tr.model.bank.bank, bank2)
    state.write_bytes(good)
    assert tr.resume() and tr.epoch == 2 and torch.equal(tr.model.bank.bank, bank2)


@pytest.mark.slow
def test_eval_and_predict_commands(run, capsys):
    from sst_dist.cli import main

    tmp = run.tmp
    assert main(["eval", str(run.run_dir), "--out", str(tmp / "evalout")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1]
    res = json.loads(line)
    assert res["checkpoint"].endswith("epoch_0002") and res["num_samples"] == 16 and 0 <= res["mAP"] <= 1
    assert list((tmp / "evalout").glob("ap_*.json")) and list((tmp / "evalout").glob("ap_*.png"))
    images = sorted((tmp / "data" / "raw-synthetic" / "test").glob("*.jpg"))[:2]
    assert main(["predict", str(run.run_dir), *map(str, images)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["image"] for r in rows] == list(map(str, images))
    names = run.class_names
    for r in rows:
        assert set(r["scores"]) == set(names) and all(0 <= s <= 1 for s in r["scores"].values())
        assert set(r["labels"]) == {n for n, s in r["scores"].items() if s >= 0.5}
    assert main(["predict", str(run.run_dir), str(tmp / "missing.jpg")]) == 2
    assert main(["eval", str(tmp / "nowhere")]) == 2
    # the ``best``/``latest`` pointer files name a checkpoint too (not a converted model file)
    best = run.run_dir / "checkpoints" / "best"
    assert main(["eval", str(best), "--out", str(tmp / "evalbest")]) == 0
    res = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1])
    assert res["checkpoint"].endswith(best.read_text().strip())
