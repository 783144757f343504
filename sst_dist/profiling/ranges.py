"""Named ``record_function`` ranges around the trainer's phases, installed from the outside.

Nothing in the model, the SST state or the engine is edited: forward pre-/post-hooks open and
close a range around each model submodule, and the bank, pseudo-label, loss, backward,
optimizer and collective entry points are replaced by thin wrappers for the duration of a
``with PhaseRanges(...)`` block (restored on exit). The ranges show up in the Chrome trace and
are what :mod:`sst_dist.profiling.breakdown` attributes profiler time to.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

PREFIX = "sst::"
# model attribute -> phase; attributes a model lacks are skipped (the model may grow or rename).
MODULE_PHASES: dict[str, str] = {
    "backbone": "backbone",
    "decoupling": "decoupling",
    "gnn": "gnn",
    "out_fc": "classifier",
    "classifier": "classifier",
    "pairs": "pair_head",
}
FORWARD_PHASES = ("backbone", "decoupling", "gnn", "classifier", "pair_head")
# DistributedSST's public stages (sst_dist.train.sst_stages.STAGES) -> phase. Every stage must be
# here and on the object: a stage renamed or dropped fails loudly instead of going untimed.
STAGE_PHASES: dict[str, str] = {
    "gather": "gather",
    "update_bank": "bank_update",
    "pseudo_labels": "pseudo_labels",
    "terms": "losses",
    "reduce": "reduction",
}
# Phases in report order; "backward/<phase>" rows come from breakdown's forward-backward linking.
PHASES = (
    "data",
    *FORWARD_PHASES,
    "gather",
    "bank_update",
    "pseudo_labels",
    "losses",
    "reduction",
    "backward",
    "optimizer",
    "communication",
    "other",
)
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "barrier",
    "gather",
    "scatter",
    "all_to_all_single",
    "all_to_all",
)

_local = threading.local()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """A profiler range for ``name`` (one of :data:`PHASES`)."""
    with torch.profiler.record_function(PREFIX + name):
        yield


def _wrap(fn: Callable[..., Any], name: str, guard: bool = False) -> Callable[..., Any]:
    """``fn`` inside a range; with ``guard``, a call nested in the same range kind opens no new one."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if guard and getattr(_local, name, False):
            return fn(*args, **kwargs)
        setattr(_local, name, True)
        try:
            with torch.profiler.record_function(PREFIX + name):
                return fn(*args, **kwargs)
        finally:
            setattr(_local, name, False)

    wrapper.__sst_profile_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


class PhaseRanges:
    """Install the ranges on a model (and optionally the SST state and the engine) while active.

    ``model``: the SST module (hooks on its submodules; its ``bank`` when no ``sst`` is given);
    ``sst``: the trainer's ``DistributedSST``, each public stage in :data:`STAGE_PHASES` timed
    by name (a missing stage raises); ``engine``:
    the DeepSpeed engine (``backward``, ``step``). Collectives of ``torch.distributed`` are
    wrapped as "communication" whatever calls them (our helpers, DeepSpeed, ZeRO).
    """

    def __init__(
        self, model: nn.Module, sst: Any = None, engine: Any = None, collectives: bool = True
    ) -> None:
        self.model, self.sst, self.engine, self.collectives = model, sst, engine, collectives
        self._handles: list[Any] = []
        self._restore: list[Callable[[], None]] = []

    # -------------------------------------------------------------- patching helpers
    def _patch_attr(
        self, obj: Any, attr: str, name: str, guard: bool = False, required: bool = False
    ) -> None:
        original = getattr(obj, attr, None)
        if original is None and required:
            raise AttributeError(
                f"profiler: {type(obj).__name__} has no stage {attr!r} (expected {sorted(STAGE_PHASES)})"
            )
        if original is None or getattr(original, "__sst_profile_wrapped__", False):
            return
        in_dict = attr in getattr(obj, "__dict__", {})
        setattr(obj, attr, _wrap(original, name, guard))

        def restore() -> None:
            if in_dict:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)

        self._restore.append(restore)

    def _hook_module(self, module: nn.Module, name: str) -> None:
        stack: list[Any] = []

        def pre(_m: nn.Module, _inputs: Any) -> None:
            rf = torch.profiler.record_function(PREFIX + name)
            rf.__enter__()
            stack.append(rf)

        def post(_m: nn.Module, _inputs: Any, _output: Any) -> None:
            if stack:
                stack.pop().__exit__(None, None, None)

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    # -------------------------------------------------------------- context manager
    def __enter__(self) -> PhaseRanges:
        if self.sst is not None:  # checked first: nothing is installed when it fails
            stages = tuple(getattr(self.sst, "stages", ()))
            if set(stages) != set(STAGE_PHASES):
                raise AttributeError(
                    f"profiler: the SST state's stages {stages} are not the profiled ones "
                    f"{tuple(STAGE_PHASES)}"
                )
        for attr, name in MODULE_PHASES.items():
            sub = getattr(self.model, attr, None)
            if isinstance(sub, nn.Module):
                self._hook_module(sub, name)
        if self.sst is not None:
            for attr, name in STAGE_PHASES.items():
                self._patch_attr(self.sst, attr, name, required=True)
        else:
            bank = getattr(self.model, "bank", None)
            if bank is not None:
                self._patch_attr(bank, "update", "bank_update")
                self._patch_attr(bank, "pseudo_labels", "pseudo_labels")
        if self.engine is not None:
            self._patch_attr(self.engine, "backward", "backward")
            self._patch_attr(self.engine, "step", "optimizer")
        if self.collectives and torch.distributed.is_available():
            import torch.distributed.distributed_c10d as c10d

            for mod in (torch.distributed, c10d):
                for fn in COLLECTIVES:
                    self._patch_attr(mod, fn, "communication", guard=True)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        while self._restore:
            self._restore.pop()()
