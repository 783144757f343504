"""Combine per-rank profile records, compare with a 1-rank baseline, write JSON, table and PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODES = ("data", "model", "e2e")
MODE_TITLES = {"data": "data pipeline", "model": "model step (synthetic)", "e2e": "end to end"}


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Run-level numbers from every rank's record (in rank order)."""
    if not records:
        raise ValueError("aggregate: no rank records")
    world = len(records)
    throughput: dict[str, Any] = {}
    memory: dict[str, int] = {}
    for mode in MODES:
        rows = [r["modes"][mode] for r in records if mode in r.get("modes", {})]
        if len(rows) != world:
            continue
        seconds = max(r["seconds"] for r in rows)
        images = sum(r["images"] for r in rows)
        throughput[mode] = {
            "images_per_s": images / seconds if seconds > 0 else 0.0,
            "images": images,
            "seconds_max": seconds,
            "per_rank_images_per_s": [r["images_per_s"] for r in rows],
        }
        memory[mode] = max(int(r["peak_memory"]["bytes"]) for r in rows)
    out: dict[str, Any] = {
        "world_size": world,
        "throughput": throughput,
        "peak_memory_bytes": memory,
        "memory_kind": records[0].get("modes", {}).get("e2e", {}).get("peak_memory", {}).get("kind"),
    }
    bds = [r["breakdown"] for r in records if r.get("breakdown")]
    if bds:
        phases = bds[0]["phases"].keys()
        out["breakdown"] = {
            "steps": bds[0]["steps"],
            "wall_ms_per_step": max(b["wall_ms_per_step"] for b in bds),
            "phases": {
                p: {k: sum(b["phases"][p][k] for b in bds) / len(bds) for k in bds[0]["phases"][p]}
                for p in phases
            },
            "max_total_ms": {p: max(b["phases"][p]["total_ms"] for b in bds) for p in phases},
        }
    for key in (
        "config",
        "overrides",
        "batch_size",
        "image_size",
        "device",
        "host",
        "torch",
        "threads",
        "epoch",
    ):
        if key in records[0]:
            out[key] = records[0][key]
    return out


def scaling(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Speed-up and efficiency of ``result`` against a baseline profile (normally 1 rank).

    efficiency = (images/s per rank here) / (images/s per rank in the baseline); 1.0 is linear.
    """
    bw, w = int(baseline.get("world_size", 1)), int(result["world_size"])
    out: dict[str, Any] = {"baseline_world_size": bw, "world_size": w}
    for mode, rec in result["throughput"].items():
        base = baseline.get("throughput", {}).get(mode)
        if not base or base["images_per_s"] <= 0:
            continue
        speedup = rec["images_per_s"] / base["images_per_s"]
        out[mode] = {"speedup": speedup, "efficiency": speedup * bw / w}
    return out


def load_baseline(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--baseline {p}: no such file (give the profile.json of a 1-rank run)")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--baseline {p}: not a profile.json (not JSON: {e})") from None
    if not isinstance(data, dict) or "throughput" not in data or "world_size" not in data:
        raise ValueError(
            f"--baseline {p}: not a profile.json (keys {sorted(data)[:8] if isinstance(data, dict) else []}; "
            "needs throughput, world_size)"
        )
    return data


def format_table(result: dict[str, Any]) -> str:
    """A short plain-text summary: throughput per mode, then the per-phase breakdown."""
    lines = [
        f"world size {result['world_size']}, batch {result.get('batch_size')} per rank, "
        f"image {result.get('image_size')} px, device {result.get('device')}"
    ]
    lines.append(f"{'mode':<24}{'images/s':>10}{'peak MiB':>10}{'efficiency':>12}")
    sc = result.get("scaling", {})
    for mode, rec in result["throughput"].items():
        eff = f"{sc[mode]['efficiency']:.2f}" if mode in sc else "-"
        mem = result["peak_memory_bytes"].get(mode, 0) / 2**20
        lines.append(f"{MODE_TITLES[mode]:<24}{rec['images_per_s']:>10.2f}{mem:>10.0f}{eff:>12}")
    bd = result.get("breakdown")
    if bd:
        total = sum(v["total_ms"] for v in bd["phases"].values()) or 1.0
        lines.append(f"per step ({bd['steps']} profiled steps, wall {bd['wall_ms_per_step']:.1f} ms/step):")
        lines.append(f"{'phase':<16}{'fwd ms':>10}{'bwd ms':>10}{'total ms':>10}{'share':>8}")
        for p, v in bd["phases"].items():
            if v["total_ms"] <= 0:
                continue
            lines.append(
                f"{p:<16}{v['forward_ms']:>10.2f}{v['backward_ms']:>10.2f}{v['total_ms']:>10.2f}"
                f"{100 * v['total_ms'] / total:>7.1f}%"
            )
    return "\n".join(lines)


def throughput_panel(ax: Any, result: dict[str, Any]) -> None:
    """Images/s of every profiled mode on ``ax``, each bar labelled with its number; a log axis
    when the modes differ by more than 20x (a fast data pipeline next to a slow model step)."""
    modes = list(result["throughput"])
    rates = [float(result["throughput"][m]["images_per_s"]) for m in modes]
    bars = ax.bar(range(len(modes)), rates, color="tab:green")
    ax.set_xticks(range(len(modes)))
    ax.set_xticklabels([MODE_TITLES.get(m, m).split(" (")[0] for m in modes])
    for bar, rate in zip(bars, rates):
        ax.annotate(f"{rate:.1f}", (bar.get_x() + bar.get_width() / 2, max(rate, 1e-9)), ha="center",
                    va="bottom", fontsize=8)
    positive = [r for r in rates if r > 0]
    if positive and max(positive) > 20 * min(positive):
        ax.set_yscale("log")
    ax.set_ylabel("images/s (all ranks)")
    ax.set_title("throughput")
    ax.tick_params(axis="x", labelrotation=15)


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Bar chart: per-phase forward/backward ms per step, and images/s per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    bd = result.get("breakdown", {}).get("phases", {})
    names = [p for p, v in bd.items() if v["total_ms"] > 0]
    fwd = [bd[p]["forward_ms"] for p in names]
    bwd = [bd[p]["backward_ms"] for p in names]
    ax1.barh(names, fwd, label="forward / own")
    ax1.barh(names, bwd, left=fwd, label="backward")
    ax1.invert_yaxis()
    ax1.set_xlabel("ms per step (profiled)")
    ax1.set_title(f"time per phase, {result['world_size']} rank(s)")
    ax1.legend(loc="lower right", fontsize=8)
    throughput_panel(ax2, result)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
