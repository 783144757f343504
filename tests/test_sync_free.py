"""A training step reads nothing from the device on the host, except on logging steps.

On the CPU there is no device to wait for, so the test counts the calls that would synchronise
on a GPU: every host read of a tensor value (``item``, ``bool``, ``float``, ``tolist``, ... all
reach ``aten::_local_scalar_dense`` or ``Tensor.tolist``) and every op whose output size depends
on the data (``nonzero``, ``masked_select``, ``unique``). The one allowed read is the label
check of the loader's host copy in ``prepare_batch`` (no device involved). The GPU check script
proves the same with ``torch.cuda.set_sync_debug_mode("error")`` (benchmarks/gpu_sync_check.py).
"""

from __future__ import annotations

import collections
import os
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from sst_dist.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(ROOT, "launch", "configs", "debug.yaml")
DATA_DEPENDENT = ("nonzero", "masked_select", "unique", "_local_scalar_dense")
HOST_READS = {"tolist", "item", "__bool__", "__float__", "__int__", "__index__", "numpy"}


def _allowed(stack: list[traceback.FrameSummary]) -> bool:
    """The label check of the host copy where the batch is made."""
    names = [f.name for f in stack]
    return "prepare_batch" in names and "check_labels" in names


def _bool_index(args: tuple) -> bool:
    idx = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)


class SyncCounter(TorchDispatchMode):
    """Counts host reads and data-dependent ops (with where they came from)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def note(self, what: str) -> None:
        stack = traceback.extract_stack()[:-2]
        if not _allowed(stack):
            here = [f"{os.path.basename(f.filename)}:{f.lineno}" for f in stack
                    if "site-packages" not in f.filename]
            self.calls[(what, " < ".join(here[-3:]))] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if any(k in str(func) for k in DATA_DEPENDENT):
            self.note(str(func))
        elif "index" in str(func) and _bool_index(args):  # x[mask]: a nonzero inside on a GPU
            self.note(f"{func} with a boolean mask")
        return func(*args, **(kwargs or {}))


class HostReads(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if getattr(func, "__name__", "") in HOST_READS:
            self.counter.note(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def count_syncs(fn) -> collections.Counter:  # noqa: ANN001
    counter = SyncCounter()
    with HostReads(counter), counter:
        fn()
    return counter.calls


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from sst_dist.train.trainer import Trainer

    os.environ["DS_ACCELERATOR"] = "cpu"
    tmp = tmp_path_factory.mktemp("syncfree")
    over = [f"output.root={tmp / 'runs'}", f"data.root={tmp / 'data'}", "train.clip_grad=1.0"]
    cfg = load_config(DEBUG, over)
    tr = Trainer(cfg)
    yield tr
    tr.release()


def test_counter_sees_the_reads_it_must(trainer) -> None:
    t = torch.ones(3)
    calls = count_syncs(lambda: (t.sum().item(), bool(t.any()), t.tolist(), t[t > 0]))
    kinds = {k for k, _ in calls}
    assert {"Tensor.item", "Tensor.__bool__", "Tensor.tolist"} <= kinds
    assert any("boolean mask" in k for k in kinds)


@pytest.mark.parametrize("epoch", [0, 1])  # warm-up, then pseudo labels and the bank
def test_training_step_does_not_synchronise(trainer, epoch) -> None:
    batch = next(iter(trainer.data.train_loader))
    trainer._set_train_mode()
    trainer.sst.set_epoch(epoch)
    trainer.train_step(batch, epoch, 0.5, sync=True)  # warm-up: first-call allocations, lazy init
    calls = count_syncs(lambda: trainer.train_step(batch, epoch, 0.5, sync=False))
    assert not calls, "host synchronisations in a training step:\n" + "\n".join(
        f"{n} x {k[0]} at {k[1]}" for k, n in calls.items()
    )
    # a logging step reads its outcome: few transfers, and the bookkeeping is right
    before = trainer.global_step
    calls = count_syncs(lambda: trainer.train_step(batch, epoch, 0.5, sync=True))
    assert 1 <= sum(calls.values()) <= 2, calls
    assert trainer.global_step == before + 1 and trainer.bad_steps == 0


def test_nonfinite_step_is_skipped_on_the_device_and_counted_at_the_sync(trainer) -> None:
    batch = next(iter(trainer.data.train_loader))
    trainer._set_train_mode()
    trainer.sst.set_epoch(1)
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    bank = trainer.model.bank.bank.clone()
    poison = trainer.model.out_fc.register_forward_hook(lambda _m, _i, out: out * float("nan"))
    try:
        step, skipped = trainer.global_step, trainer.skipped_steps
        calls = count_syncs(lambda: trainer.train_step(batch, 1, 0.5, sync=False))
        assert not calls
        assert trainer.skipped_steps == skipped  # the host has not looked yet
        trainer.settle()
        assert trainer.skipped_steps == skipped + 1 and trainer.global_step == step
        assert trainer.bad_steps == 1
    finally:
        poison.remove()
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, params[n]), n
    assert torch.equal(trainer.model.bank.bank, bank)
    res = trainer.train_step(batch, 1, 0.5)
    assert res.finite and trainer.bad_steps == 0 and trainer.global_step == step + 1
