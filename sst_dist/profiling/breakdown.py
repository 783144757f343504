"""Per-phase time from a ``torch.profiler`` run, forward and backward, without double counting.

Every profiler event's *self* time (CPU, and device time of the kernels it launched) goes to the
nearest enclosing ``sst::<phase>`` range (see :mod:`.ranges`); time outside all ranges is
"other". Backward work is attributed to the phase whose forward created it: the autograd
engine's ``evaluate_function`` events carry the sequence number of the forward op that built
their node, so a forward pass over the ranges maps (thread, sequence number) -> phase, and the
backward event goes to ``backward/<phase>`` (``backward/backward`` when the forward op ran
outside every range). Collectives nested anywhere stay "communication".
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sst_dist.profiling.ranges import FORWARD_PHASES, PHASES, PREFIX

BACKWARD_EVENT = "autograd::engine::evaluate_function"
_FORWARD_LABELS = set(FORWARD_PHASES) | {"gather", "bank_update", "pseudo_labels", "losses", "reduction"}


def _range_name(name: str) -> str | None:
    return name[len(PREFIX) :] if name.startswith(PREFIX) else None


def _roots(events: list[Any]) -> list[Any]:
    return [e for e in events if getattr(e, "cpu_parent", None) is None]


def _walk(roots: list[Any], visit: Any, label: str = "other") -> None:
    """Depth-first over the event forest; ``visit(event, inherited) -> label for the subtree``."""
    stack = [(e, label) for e in reversed(roots)]
    while stack:
        ev, inherited = stack.pop()
        lab = visit(ev, inherited)
        stack.extend((c, lab) for c in reversed(getattr(ev, "cpu_children", []) or []))


def forward_sequence_map(events: list[Any]) -> dict[tuple[int, int], str]:
    """(thread, sequence_nr) of every forward op inside a phase range -> that phase."""
    seq: dict[tuple[int, int], str] = {}

    def visit(ev: Any, inherited: str) -> str:
        name = _range_name(ev.name)
        lab = name if name is not None else inherited
        if lab in _FORWARD_LABELS and not ev.name.startswith(BACKWARD_EVENT):
            nr = getattr(ev, "sequence_nr", -1)
            if nr is not None and nr >= 0:
                seq.setdefault((ev.thread, nr), lab)
        return lab

    _walk(_roots(events), visit)
    return seq


def attribute(events: list[Any]) -> dict[str, dict[str, float]]:
    """Label -> {"cpu_us", "device_us"} summed self times (labels: phases and ``backward/<phase>``)."""
    seq = forward_sequence_map(events)
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"cpu_us": 0.0, "device_us": 0.0})

    def visit(ev: Any, inherited: str) -> str:
        name = _range_name(ev.name)
        if inherited == "communication":
            lab = inherited
        elif name == "backward":
            lab = "backward/backward"
        elif name is not None:
            lab = name
        elif ev.name.startswith(BACKWARD_EVENT):
            fwd = seq.get((getattr(ev, "fwd_thread", ev.thread), getattr(ev, "sequence_nr", -1)))
            lab = (
                f"backward/{fwd}"
                if fwd
                else (inherited if inherited.startswith("backward/") else "backward/backward")
            )
        else:
            lab = inherited
        rec = out[lab]
        rec["cpu_us"] += float(getattr(ev, "self_cpu_time_total", 0.0) or 0.0)
        rec["device_us"] += float(getattr(ev, "self_device_time_total", 0.0) or 0.0)
        return lab

    _walk(_roots(events), visit)
    return dict(out)


def phase_table(events: list[Any], steps: int) -> dict[str, dict[str, float]]:
    """Per step, per phase: forward_ms, backward_ms, total_ms and device_ms (all phases listed)."""
    raw = attribute(events)
    steps = max(1, steps)
    table: dict[str, dict[str, float]] = {}
    for p in PHASES:
        fwd = raw.get(p, {"cpu_us": 0.0, "device_us": 0.0})
        bwd = raw.get(f"backward/{p}", {"cpu_us": 0.0, "device_us": 0.0})
        table[p] = {
            "forward_ms": fwd["cpu_us"] / 1e3 / steps,
            "backward_ms": bwd["cpu_us"] / 1e3 / steps,
            "total_ms": (fwd["cpu_us"] + bwd["cpu_us"]) / 1e3 / steps,
            "device_ms": (fwd["device_us"] + bwd["device_us"]) / 1e3 / steps,
        }
    unknown = sorted(k for k in raw if k not in PHASES and not k.startswith("backward/"))
    for k in unknown:  # a range name not in PHASES (should not happen) is still reported
        table[k] = {
            "forward_ms": raw[k]["cpu_us"] / 1e3 / steps,
            "backward_ms": 0.0,
            "total_ms": raw[k]["cpu_us"] / 1e3 / steps,
            "device_ms": raw[k]["device_us"] / 1e3 / steps,
        }
    return table
