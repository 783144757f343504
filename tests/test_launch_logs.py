"""What a user watching a batch job sees: plots that stay readable (80+ classes, every profiled
mode's throughput)."""

from __future__ import annotations

import math
import struct

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sst_dist.metrics import SUMMARY_KEYS  # noqa: E402
from sst_dist.profiling.report import throughput_panel  # noqa: E402
from sst_dist.train.evaluate import ap_plot_rows, save_ap_artifacts  # noqa: E402


def _ap_result(n: int) -> dict:
    ap = [((i * 37) % 100) / 100 for i in range(n)]
    ap[3] = ap[50] = math.nan  # no positives in the test split
    return {"ap": ap, **{k: 0.5 for k in SUMMARY_KEYS}}


def test_ap_plot_sorted_best_first_missing_classes_last():
    result = _ap_result(85)
    names = [f"c{i}" for i in range(85)]
    rows = ap_plot_rows(names, result["ap"])
    assert sorted(n for n, _ in rows) == sorted(names)  # every class is drawn
    values = [v for _, v in rows if v is not None]
    assert values == sorted(values, reverse=True)
    assert [n for n, v in rows[-2:]] == ["c3", "c50"] and all(v is None for _, v in rows[-2:])


def test_ap_png_gives_each_of_85_classes_its_own_row(tmp_path):
    save_ap_artifacts(_ap_result(85), None, tmp_path, "t")
    head = (tmp_path / "ap_t.png").read_bytes()[:24]
    width, height = struct.unpack(">II", head[16:24])
    assert height >= 85 * 14, f"{height} px for 85 class names: they would overlap"
    assert width <= 1000, f"{width} px wide: the chart should grow downwards, not sideways"


def test_profile_plot_labels_every_mode_and_uses_a_log_axis_for_a_wide_range():
    fig, ax = plt.subplots()
    result = {"throughput": {"data": {"images_per_s": 5000.0}, "model": {"images_per_s": 10.0},
                             "e2e": {"images_per_s": 9.5}}}
    throughput_panel(ax, result)
    texts = {t.get_text() for t in ax.texts}
    assert {"5000.0", "10.0", "9.5"} <= texts, texts
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["data pipeline", "model step", "end to end"]
    plt.close(fig)
