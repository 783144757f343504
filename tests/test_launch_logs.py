"""What a user watching a batch job sees: plots that stay readable (80+ classes, every profiled
mode's throughput)."""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from launch_support import DEBUG_CONFIG, ROOT, launch_env  # noqa: E402

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


def test_step_line_and_ticker_by_hand():
    from sst_dist.train.logging_utils import StepLine, Ticker

    steps = StepLine(total_steps=100, step=10)
    steps.waited(0.0)
    steps.done(64)
    text = steps.line(20, epoch=1, i=5, n=50, loss=1.23456, lr=1e-4)
    assert re.fullmatch(r"step 20/100 \(epoch 1, 5/50\) loss 1\.2346 lr 0\.0001 [\d.]+ img/s "
                        r"data wait \d+% ETA \d+:\d\d:\d\d", text), text
    seen: list[str] = []
    ticker = Ticker("evaluating: batch", 25, seen.append)
    for _ in range(25):
        ticker.tick()
    assert [s.split(",")[0] for s in seen] == [f"evaluating: batch {k}/25 ({4 * k}%)"
                                               for k in (3, 6, 9, 12, 15, 18, 21, 24, 25)]


def test_batch_job_sees_step_lines_on_stderr_and_results_alone_on_stdout(tmp_path):
    """A training run without a terminal: a line every train.log_every steps on stderr (and in
    train.log), none of the logging on stdout; eval prints only its JSON on stdout and its
    progress on stderr."""
    env = {**launch_env(tmp_path), "SST_PROGRESS": "0"}
    args = [f"output.root={tmp_path}", "output.name=r", f"data.root={tmp_path / 'data'}", "train.epochs=1"]
    r = subprocess.run([sys.executable, "-m", "sst_dist.cli", "train", str(DEBUG_CONFIG), *args], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = re.findall(r"step (\d+)/8 \(epoch 0, (\d+)/8\) loss [\d.]+ lr [\d.e-]+ [\d.]+ img/s "
                       r"data wait \d+% ETA \d+:\d\d:\d\d", r.stderr)
    assert lines == [(str(k), str(k)) for k in (2, 4, 6, 8)], r.stderr[-3000:]
    assert "step 2/8" in (tmp_path / "r" / "train.log").read_text()
    assert " INFO " not in r.stdout, r.stdout[-2000:]
    ev = subprocess.run([sys.executable, "-m", "sst_dist.cli", "eval", str(tmp_path / "r")], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert 0.0 <= json.loads(ev.stdout)["mAP"] <= 1.0, ev.stdout  # stdout is exactly the result
    assert "evaluating: batch 4/4 (100%)" in ev.stderr, ev.stderr[-2000:]
