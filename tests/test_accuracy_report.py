"""The accuracy study's report: differences paired by seed, per-epoch pseudo labels, and a doc
whose written analysis survives a regenerated study section."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from accuracy_report import STUDY_BEGIN, STUDY_END, splice, summarize, write_outputs  # noqa: E402


def _run(method, q, seed, mAP, inter_count=0.0):
    epoch = {"epoch": 2, "intra_precision": 0.0, "intra_recall": 0.0, "intra_count": 0.0,
             "inter_precision": 0.75, "inter_recall": 0.2, "inter_count": inter_count}
    return {"method": method, "proportion": q, "seed": seed, "mAP": mAP, "epochs": [epoch], "seconds": 60.0}


RESULTS = [
    _run("sst", 10, 0, 60.0, 40), _run("baseline", 10, 0, 58.0),
    _run("sst", 10, 1, 50.0, 20), _run("baseline", 10, 1, 49.0),
    _run("sst", 10, 2, 70.0, 30),  # no baseline for seed 2: not paired
    _run("nointer", 10, 0, 57.0),
]


def test_differences_are_paired_by_seed():
    s = summarize(RESULTS)
    assert s["mAP"]["sst"][10]["n"] == 3 and s["mAP"]["sst"][10]["mean"] == pytest.approx(60.0)
    paired = s["vs_baseline"]["sst"][10]
    assert paired["values"] == [2.0, 1.0] and paired["mean"] == pytest.approx(1.5)
    assert s["vs_sst"]["nointer"][10]["values"] == [-3.0]
    assert s["pseudo"]["sst"][10][2]["inter_count"] == pytest.approx(30.0)
    assert "baseline" not in s["pseudo"]


def test_splice_keeps_the_written_analysis():
    doc = f"# Title\n\nintro\n\n{STUDY_BEGIN}\nold table\n{STUDY_END}\n\n## Analysis\nkept\n"
    out = splice(doc, f"{STUDY_BEGIN}\nnew table\n{STUDY_END}")
    assert "new table" in out and "old table" not in out and out.endswith("## Analysis\nkept\n")
    assert out.startswith("# Title\n\nintro\n")
    fresh = splice("# Only a title\nbody\n", f"{STUDY_BEGIN}\nT\n{STUDY_END}")
    assert fresh.index("T") < fresh.index("body")


def test_write_outputs(tmp_path):
    meta = {"host": "h", "date": "2026-12-02T00:00", "cpu_count": 2, "run_minutes_total": 6.0, "errors": [],
            "methods": {"sst": [], "baseline": ["loss.intra_bce=0"], "nointer": ["loss.inter_bce=0"]},
            "settings": {"config": "launch/configs/accuracy.yaml", "set": [], "num_train": 1, "num_test": 1,
                         "difficulty": "hard", "num_classes": 16, "image_size": 128,
                         "backbone": "efficientnet_lite0", "pretrained": "IMAGENET1K_V1", "freeze": "layer4",
                         "trunk_bn": "train", "epochs": 6, "batch_size": 16, "lr": 1e-4, "lr_gamma": 0.1,
                         "lr_step_epochs": 5, "warmup_epochs": 2, "margin_start": 0.95, "margin_step": 0.05,
                         "margin_min": 0.75}}
    (tmp_path / "accuracy.md").write_text("# Accuracy\n\n## Random trunk\nold study\n")
    from data_shards.results_out import file_output

    results_json = file_output(str(tmp_path / "r.json"), "", overwrite=False)
    section = write_outputs(RESULTS, meta, tmp_path, results_json)
    md = (tmp_path / "accuracy.md").read_text()
    assert "| **SST - baseline, paired by seed** | +1.50 ± 0.71 (2) |" in section
    assert "| nointer | 10 | 57.00 | 57.00 | -3.00 (1) | -1.00 (1) |" in section
    assert md.endswith("## Random trunk\nold study\n") and (tmp_path / "accuracy.png").stat().st_size > 0
