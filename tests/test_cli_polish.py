"""User-facing CLI details: argument errors exit 2 with one line, help says what the code does.

Each test stands for a defect found by a walkthrough of the commands (eval, convert-checkpoint,
smoke, predict, bench, profile): a traceback where a user error was meant, or help text that
disagreed with the code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_convert import reference_state_dict

from sst_dist.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "launch" / "configs" / "debug.yaml"


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _usage_error(capsys, argv: list[str], *needles: str) -> str:
    """``argv`` is refused by the parser: exit 2, no traceback, the needles on stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    """``argv`` returns 2 with exactly one stderr line holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
    return err


# --- eval ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-epoch, two-step debug run (DeepSpeed on the CPU accelerator)."""
    from sst_dist.config import load_config
    from sst_dist.train.trainer import Trainer

    os.environ["DS_ACCELERATOR"] = "cpu"
    tmp = tmp_path_factory.mktemp("polish")
    cfg = load_config(DEBUG, [
        f"output.root={tmp / 'runs'}", "output.name=r", f"data.root={tmp / 'data'}", "train.epochs=1",
        "train.max_steps_per_epoch=2", "output.tensorboard=false", "train.progress=false",
    ])
    tr = Trainer(cfg)
    tr.train()
    return tr.run_dir


def test_eval_negative_max_batches_is_an_argument_error(run_dir, capsys):
    _usage_error(capsys, ["eval", str(run_dir), "--max-batches", "-1"], "--max-batches", "-1")
    _usage_error(capsys, ["eval", str(run_dir), "--max-batches", "x"], "--max-batches")


def test_eval_help_says_zero_is_all_and_where_out_goes(capsys):
    text = " ".join(_help(capsys, "eval").split())
    assert "default 0: all batches" in text
    assert "beside the checkpoint" not in text
    assert "inside the checkpoint directory itself" in text and "RUN/eval/" in text


def test_eval_default_out_is_the_checkpoint_directory(run_dir, tmp_path, capsys):
    """What the --out help promises: without --out, the AP files land in the checkpoint itself."""
    run = shutil.copytree(run_dir, tmp_path / "r")
    assert main(["eval", str(run), "--max-batches", "1"]) == 0
    ckpt = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"])
    assert ckpt.parent == run / "checkpoints"
    want = [f"ap_{ckpt.name}_test_first1.{e}" for e in ("json", "png")]  # a partial evaluation says so
    assert sorted(p.name for p in ckpt.glob("ap_*")) == want


def test_eval_keeps_an_earlier_result_unless_overwrite(run_dir, tmp_path, capsys):
    """A second eval replaced the first one's AP files (found by an audit), and two runs evaluated
    into one --out wrote the same name."""
    import hashlib

    def digests(d: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("ap_*"))}

    run, other = shutil.copytree(run_dir, tmp_path / "r"), shutil.copytree(run_dir, tmp_path / "q")
    out = tmp_path / "o"
    assert main(["eval", str(run), "--out", str(out), "--max-batches", "1"]) == 0
    assert main(["eval", str(other), "--out", str(out), "--max-batches", "1"]) == 0
    capsys.readouterr()
    first = digests(out)
    ckpt = (run / "checkpoints" / "latest").read_text().split()[0]
    names = [f"ap_{r}_{ckpt}_test_first1.{e}" for r in ("r", "q") for e in ("json", "png")]
    assert sorted(first) == sorted(names)
    _one_line_error(capsys, ["eval", str(run), "--out", str(out), "--max-batches", "1"],
                    f"ap_r_{ckpt}_test_first1.json", "earlier result", "--overwrite")
    assert digests(out) == first
    assert main(["eval", str(run), "--out", str(out), "--max-batches", "1", "--overwrite"]) == 0
    assert sorted(digests(out)) == sorted(first)


def test_eval_out_that_is_a_file_is_refused_before_any_work(run_dir, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("keep me")
    _one_line_error(capsys, ["eval", str(run_dir), "--out", str(f)], "--out", str(f), "not a directory")
    assert f.read_text() == "keep me"


# --- convert-checkpoint / safe_load ------------------------------------------------------


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.parametrize("trust", [False, True])
def test_convert_refuses_files_that_are_not_torch_checkpoints(tmp_path, capsys, trust):
    flag = ["--trust-checkpoint"] if trust else []
    marker = tmp_path / "marker"
    inputs = {
        "some_text_file.txt": b"cat at the door\nsome text\n",  # `c`: pickle's GLOBAL opcode
        "raw.pkl": pickle.dumps(Payload(marker), protocol=0),  # a bare pickle: text, and live code
        "random.bin": bytes(range(7, 200)),
        "empty.pth": b"",
    }
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
        argv = ["convert-checkpoint", *flag, str(tmp_path / name), str(tmp_path / "o.pt")]
        err = _one_line_error(capsys, argv, str(tmp_path / name), "not a torch checkpoint")
        assert "only pickle" not in err, err
    assert not marker.exists()  # nothing was unpickled, trusted or not
    (tmp_path / "dir").mkdir()
    _one_line_error(capsys, ["convert-checkpoint", *flag, str(tmp_path / "dir"), str(tmp_path / "o.pt")],
                    str(tmp_path / "dir"), "is a directory")
    torch.save([1, 2, 3], tmp_path / "list.pt")  # a torch file, but no state dict: still named
    _one_line_error(capsys, ["convert-checkpoint", *flag, str(tmp_path / "list.pt"), str(tmp_path / "o.pt")],
                    str(tmp_path / "list.pt"), "state dict")
    assert not (tmp_path / "o.pt").exists()


def test_convert_damaged_stream_with_trust_is_one_line(tmp_path, capsys):
    """A real torch header over a torn pickle: whatever pickle raises becomes one line."""
    import io

    buf = io.BytesIO()
    torch.save({"a": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    bad = tmp_path / "torn.pth"
    bad.write_bytes(buf.getvalue()[:30] + b"cos\nsystem\n")
    for flag in ([], ["--trust-checkpoint"]):
        _one_line_error(capsys, ["convert-checkpoint", *flag, str(bad), str(tmp_path / "o.pt")], str(bad))


def test_load_tensors_still_reads_zip_and_legacy_files(tmp_path):
    from sst_dist.safe_load import load_tensors, torch_file_format

    for legacy in (False, True):
        f = tmp_path / f"s{legacy}.pt"
        torch.save({"w": torch.arange(3.0)}, f, _use_new_zipfile_serialization=not legacy)
        assert torch_file_format(f) == ("legacy" if legacy else "zip")
        for trust in (False, True):
            assert torch.equal(load_tensors(f, trust=trust)["w"], torch.arange(3.0))
    for protocol in (2, 4, 5):
        f = tmp_path / f"p{protocol}.pt"
        torch.save({"w": torch.ones(1)}, f, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
        assert torch_file_format(f) == "legacy"


# --- smoke -----------------------------------------------------------------------------------


def test_smoke_unknown_backbone_is_a_usage_error(capsys):
    _usage_error(capsys, ["smoke", "--backbone", "resnet19"], "--backbone", "resnet19", "efficientnet_lite0")
    _usage_error(capsys, ["smoke", "--classes", "1"], "--classes")
    _usage_error(capsys, ["smoke", "--batch-size", "0"], "--batch-size")
    _usage_error(capsys, ["smoke", "--image-size", "8"], "--image-size")


def test_smoke_batch_too_small_for_the_image_is_one_line(capsys):
    """One image at 64 px leaves one value per neck BatchNorm channel (was a traceback, exit 1)."""
    _one_line_error(capsys, ["smoke", "--image-size", "64", "--batch-size", "1", "--classes", "3"],
                    "--batch-size 1", "--image-size 64", "BatchNorm")


def test_smoke_device_problems_are_one_line(capsys, monkeypatch):
    _one_line_error(capsys, ["smoke", "--device", "bogus"], "--device", "bogus")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _one_line_error(capsys, ["smoke", "--impl", "triton", "--device", "cpu"], "--impl triton")
    if not torch.cuda.is_available():
        _one_line_error(capsys, ["smoke", "--device", "cuda"], "--device cuda", "no CUDA")


def test_smoke_help_documents_every_option_and_exit_status(capsys):
    from sst_dist.cli import build_parser
    from sst_dist.model.config import BACKBONES

    parser = build_parser(only="smoke")
    smoke = parser._subparsers._group_actions[0].choices["smoke"]
    for action in smoke._actions:
        assert action.help, action.option_strings
    text = _help(capsys, "smoke")
    assert all(name in text for name in BACKBONES)
    assert "exit status" in text and "FAILED" in text


# --- predict ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    torch.save({"state_dict": reference_state_dict()}, tmp / "official.pth")
    assert main(["convert-checkpoint", str(tmp / "official.pth"), str(tmp / "sst.pt")]) == 0
    return tmp / "sst.pt"


def test_convert_of_a_converted_file_says_so(capsys, converted, tmp_path):
    _one_line_error(capsys, ["convert-checkpoint", str(converted), str(tmp_path / "again.pt")],
                    str(converted), "already converted")
    assert not (tmp_path / "again.pt").exists()


def test_predict_threshold_help_and_non_finite_values(capsys, converted, tmp_path):
    text = " ".join(_help(capsys, "predict").split())
    assert "logit >= THRESHOLD" in text and "sigmoid(THRESHOLD)" in text and "default 0.0" in text
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(image)
    for value in ("nan", "inf", "x"):
        _usage_error(capsys, ["predict", str(converted), str(image), "--threshold", value], "--threshold")


def test_predict_names_the_bad_file_and_still_predicts_the_rest(capsys, converted, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good)
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    folder = tmp_path / "imgs"
    folder.mkdir()
    capsys.readouterr()
    assert main(["predict", str(converted), str(text), str(good), str(folder)]) == 2
    out, err = capsys.readouterr()
    assert [json.loads(x)["image"] for x in out.splitlines()] == [str(good)]
    assert "BytesIO" not in err, err
    assert f"{text}: not an image file" in err, err
    assert f"{folder} is a directory, not an image file" in err, err
    assert "2 of 3 images could not be read" in err, err


# --- bench / profile / top-level help --------------------------------------------------------


def test_bench_without_a_name_lists_the_benchmarks(capsys):
    _one_line_error(capsys, ["bench"], "give a benchmark NAME", "heads", "accuracy")


def test_top_level_help_lists_every_benchmark(capsys):
    from sst_dist import bench_cli
    from sst_dist.cli import SUBCOMMANDS

    line = SUBCOMMANDS["bench"][1]
    assert line in " ".join(_help(capsys).split())
    assert all(name in line for name in bench_cli.BENCHMARKS), line


@pytest.mark.parametrize("command", ["bench", "profile", "smoke", "eval", "predict", "convert-checkpoint"])
def test_help_documents_exit_statuses(capsys, command):
    text = _help(capsys, command)
    assert "exit status:" in text and "  2  " in text, text


def test_bench_script_usage_names_the_command(capfd):
    """``sst-dist bench heads --help`` prints the script's options under the command's name."""
    from sst_dist.cli import main

    assert main(["bench", "heads", "--help"]) == 0
    assert capfd.readouterr().out.startswith("usage: sst-dist bench heads "), "usage line"


def test_bench_paths_are_relative_to_the_callers_directory(tmp_path, monkeypatch):
    """`sst-dist bench heads --out heads.json` writes into the current directory, not into the
    source tree (the benchmark used to run in the repository root)."""
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "heads", "--classes", "6", "--batch", "2", "--spatial", "4", "--feature-dim", "32",
            "--repeats", "1", "--warmup", "0", "--no-rss", "--out", "heads_rel.json"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "heads_rel.json").read_text())["heads"]
    assert not (ROOT / "heads_rel.json").exists()


@pytest.mark.parametrize(
    ("script", "args", "needle"),
    [
        ("heads.py", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
        ("heads.py", ["--classes", "1"], "--classes must be >= 2, got 1"),
        ("heads.py", ["--threads", "-1"], "--threads must be >= 0, got -1"),
        ("heads.py", ["--batch", "0"], "--batch must be >= 1, got 0"),
        ("loader.py", ["--images", "2", "--batch-size", "4"], "--images 2 is fewer than one batch"),
        ("loader.py", ["--out", str(DEBUG)], "exists and is not a directory"),
        ("step.py", ["data.proportio=0.1"], "unknown config key data.proportio"),
    ],
)
def test_benchmark_argument_errors_exit_2_before_any_work(script, args, needle):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
