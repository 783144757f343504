"""Synthetic data never replaces what a command did not just make (`shards synthetic`, training's
on-demand generation, launch/demo.sh): every refusal comes before the first write, in one line
with exit status 2, and a failure half way leaves what was there as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_shards import format as fmt
from sst_dist.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "launch" / "configs" / "debug.yaml"
QUIET = ["--workers", "0", "--no-progress"]
TINY = ["--n-train", "3", "--n-test", "2", "--image-size", "32", "--num-classes", "4", *QUIET]


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256 (or link target)} of everything under ``root`` (nothing: {})."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def synthetic(out: Path, *extra: str) -> int:
    return main(["shards", "synthetic", "--out", str(out), *TINY, *extra])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def raw_matches_shards(out: Path, raw: Path, name: str = "synthetic") -> None:
    """The raw folder is the exact source of the shards: same image count, no stale JPEGs."""
    for split in ("train", "test"):
        images = sorted((raw / split).glob("*.jpg")) if (raw / split).exists() else []
        info = fmt.info_path(out, name, split)
        n = json.loads(info.read_text())["num_samples"] if info.exists() else 0
        assert len(images) == n, (split, [p.name for p in images], n)


# -- 4a. a second run into the same --out ---------------------------------------------------------
def test_second_run_refuses_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "syn"
    assert synthetic(out) == 0
    before = snapshot(out)
    assert synthetic(out, "--seed", "7", "--num-classes", "5") == 2
    err = one_line(capsys)
    assert str(out) in err and "--overwrite" in err
    assert snapshot(out) == before  # raw JPEGs and COCO JSON untouched, not just the shards


def test_overwrite_replaces_the_whole_dataset_without_stale_raw_images(tmp_path, capsys):
    out = tmp_path / "syn"
    assert synthetic(out, "--n-train", "5") == 0
    assert synthetic(out, "--n-train", "2", "--seed", "9", "--overwrite") == 0
    raw_matches_shards(out, out / "raw-synthetic")
    record = json.loads((out / "synthetic.json").read_text())
    assert (record["n_train"], record["seed"]) == (2, 9)
    assert main(["shards", "verify", str(out)]) == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


# -- 4b. --raw-dir pointed at a user's folder -----------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_raw_dir_holding_a_users_files_is_refused(tmp_path, capsys, overwrite):
    user = tmp_path / "usercoco"
    (user / "train").mkdir(parents=True)
    (user / "instances_train.json").write_text('{"images": [], "annotations": [], "categories": []}')
    (user / "train" / "train_0000000.jpg").write_bytes(b"my photo")
    before = snapshot(user)
    out = tmp_path / "fresh"
    extra = ["--overwrite"] if overwrite else []
    assert synthetic(out, "--raw-dir", str(user), *extra) == 2
    err = one_line(capsys)
    assert str(user) in err and "--raw-dir" in err
    assert snapshot(user) == before
    assert not out.exists()


def test_raw_dir_made_by_the_command_is_its_own(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert synthetic(tmp_path / "a", "--raw-dir", str(raw)) == 0
    raw_matches_shards(tmp_path / "a", raw)
    before = snapshot(raw)
    assert synthetic(tmp_path / "b", "--raw-dir", str(raw)) == 2  # the source of a's shards
    assert str(raw) in one_line(capsys) and snapshot(raw) == before
    assert not (tmp_path / "b").exists()
    assert synthetic(tmp_path / "a", "--raw-dir", str(raw), "--seed", "4", "--overwrite") == 0
    raw_matches_shards(tmp_path / "a", raw)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert synthetic(tmp_path / "c", "--raw-dir", str(empty)) == 0  # an empty folder is a new one


# -- 4c. another --name into the same --out -------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_second_dataset_name_keeps_the_first_intact(tmp_path, capsys, overwrite):
    out = tmp_path / "syn2"
    assert synthetic(out) == 0
    before = snapshot(out)
    extra = ["--overwrite"] if overwrite else []
    assert synthetic(out, "--name", "other", "--seed", "5", *extra) == 2
    err = one_line(capsys)
    assert "synthetic.json" in err and "--out" in err
    assert snapshot(out) == before
    from data_shards.synthetic import check_params, generation_params

    check_params(out, generation_params(3, 2, 4, 32, 0, 4, "easy"))  # the first one's record


def test_old_record_without_a_name_still_reads(tmp_path, capsys):
    out = tmp_path / "syn"
    assert synthetic(out) == 0
    record = json.loads((out / "synthetic.json").read_text())
    record.pop("name", None)
    (out / "synthetic.json").write_text(json.dumps(record))  # as written before names were recorded
    (out / "raw-synthetic" / "synthetic-raw.json").unlink()  # and before raw folders were marked
    before = snapshot(out)
    assert synthetic(out, "--name", "other") == 2 and snapshot(out) == before
    capsys.readouterr()
    assert synthetic(out, "--overwrite", "--seed", "2") == 0  # its own dataset: replaced
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 2
    raw_matches_shards(out, out / "raw-synthetic")
    (out / "raw-synthetic" / "synthetic-raw.json").unlink()
    (out / "raw-synthetic" / "train" / "holiday.jpg").write_bytes(b"not a scene")  # a user's file
    before = snapshot(out)
    assert synthetic(out, "--overwrite", "--seed", "3") == 2
    assert "raw-synthetic" in one_line(capsys) and snapshot(out) == before


# -- 9. all refusals before anything is written; the record and the splits agree ----------------
def test_lone_test_split_is_refused_before_the_train_split_is_written(tmp_path, capsys):
    made = tmp_path / "made"
    assert synthetic(made, "--num-classes", "5") == 0
    out = tmp_path / "out"
    out.mkdir()
    for p in made.glob("synthetic-test-*"):
        shutil.copy2(p, out / p.name)
    before = snapshot(out)
    assert synthetic(out, "--num-classes", "12") == 2
    err = one_line(capsys)
    assert str(out) in err and "test" in err
    assert snapshot(out) == before


def test_overwrite_with_no_test_split_removes_the_stale_one(tmp_path, capsys):
    out = tmp_path / "syn"
    assert synthetic(out) == 0
    assert synthetic(out, "--overwrite", "--n-test", "0", "--num-classes", "5") == 0
    assert not list(out.glob("synthetic-test-*"))
    assert json.loads((out / "synthetic.json").read_text())["n_test"] == 0
    assert fmt.read_info(out, "train")["num_classes"] == 5
    raw_matches_shards(out, out / "raw-synthetic")
    assert main(["shards", "verify", str(out)]) == 0


def test_no_test_split_wanted_but_one_is_there_without_overwrite(tmp_path, capsys):
    out = tmp_path / "syn"
    assert synthetic(out) == 0
    before = snapshot(out)
    assert synthetic(out, "--n-test", "0") == 2
    assert "--overwrite" in one_line(capsys) and snapshot(out) == before


@pytest.mark.parametrize("where", ["test_split", "record"])
@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_half_way_leaves_everything_as_it_was(tmp_path, capsys, monkeypatch, existing, where):
    """Ctrl-C after the train split was committed (during the test split's conversion), or after
    both splits and the raw folder were swapped in (writing the record): everything goes back."""
    import data_shards.convert as convert
    import data_shards.synthetic_build as build

    out = tmp_path / "syn"
    if existing:
        assert synthetic(out) == 0
    before = snapshot(out)
    real = convert.convert_labeled

    def failing(data, out_dir, name, split, **kw):
        if split == "test":
            raise KeyboardInterrupt
        return real(data, out_dir, name, split, **kw)

    def no_record(*a, **kw):
        raise KeyboardInterrupt

    if where == "test_split":
        monkeypatch.setattr(convert, "convert_labeled", failing)
    else:
        monkeypatch.setattr(build, "record_params", no_record)
    with pytest.raises(KeyboardInterrupt):
        synthetic(out, "--overwrite", "--seed", "6", "--num-classes", "5", "--n-train", "4")
    assert snapshot(out) == before
    assert out.exists() == existing


# -- 5a. training's on-demand generation ----------------------------------------------------------
def _cfg(root, **kw):
    from sst_dist.config import load_config

    s = {"num_train": 8, "num_test": 4, "image_size": 32, "num_classes": 6, "seed": 3, **kw}
    return load_config(DEBUG, [f"data.root={root}", "data.synthetic.enabled=true", "model.num_classes=6",
                               *(f"data.synthetic.{k}={v}" for k, v in s.items())])


@pytest.mark.parametrize("content", ["train_split_only", "user_file", "raw_only"])
def test_training_refuses_a_data_root_it_cannot_trust(tmp_path, capsys, content):
    from sst_dist.train.data import DataError, ensure_synthetic

    root = tmp_path / "data"
    if content == "train_split_only":
        assert main(["shards", "synthetic", "--out", str(root), "--n-train", "8", "--n-test", "0",
                     "--seed", "3", "--num-classes", "6", "--image-size", "32", *QUIET]) == 0
    elif content == "user_file":
        root.mkdir()
        (root / "notes.txt").write_text("mine")
    else:
        (root / "raw-synthetic").mkdir(parents=True)
        (root / "raw-synthetic" / "instances_train.json").write_text("{}")
    before = snapshot(root)
    with pytest.raises(DataError) as e:
        ensure_synthetic(_cfg(root))
    msg = str(e.value)
    assert "\n" not in msg and str(root) in msg
    assert snapshot(root) == before


def test_training_generates_into_an_empty_root_and_reuses_it(tmp_path):
    from sst_dist.train.data import ensure_synthetic

    root = tmp_path / "data"
    root.mkdir()
    ensure_synthetic(_cfg(root))
    assert fmt.find_info(root, "train") and fmt.find_info(root, "test")
    assert sorted((root / "raw-synthetic" / "test").glob("*.jpg"))  # tests and docs use these
    before = snapshot(root)
    ensure_synthetic(_cfg(root))
    assert snapshot(root) == before


def test_a_generation_killed_by_sigterm_does_not_block_the_next(tmp_path, caplog):
    """``timeout`` and SLURM stop a job with SIGTERM, which runs no rollback: the hidden .tmp
    leftovers made the next run refuse data.root as "not empty" (found by killing one here)."""
    import signal
    import time

    root = tmp_path / "data"
    here = str(Path(__file__).parent)
    code = (f"import sys; sys.path.insert(0, {here!r}); from test_synthetic_safety import _cfg; "
            "from sst_dist.train.data import ensure_synthetic; "
            f"ensure_synthetic(_cfg({str(root)!r}, num_train=4000))")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "DS_ACCELERATOR": "cpu"})
    deadline = time.time() + 120
    while not (root.is_dir() and any(p.name.endswith(".tmp") for p in root.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the generation ended before it was stopped"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    leftovers = snapshot(root)
    assert leftovers and all(k.split("/")[0].startswith(".") for k in leftovers)

    from sst_dist.train.data import ensure_synthetic

    ensure_synthetic(_cfg(root))
    assert fmt.find_info(root, "train") and fmt.find_info(root, "test")
    after = snapshot(root)
    assert {k: after[k] for k in leftovers} == leftovers  # kept: a backup among them may be someone's
    assert "interrupted generation" in caplog.text


def test_train_cli_exits_2_on_a_lone_train_split(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["shards", "synthetic", "--out", str(root), "--n-train", "8", "--n-test", "0",
                 "--seed", "3", "--num-classes", "6", "--image-size", "32", *QUIET]) == 0
    before = snapshot(root)
    capsys.readouterr()
    rc = main(["train", str(DEBUG), f"data.root={root}", "data.synthetic.enabled=true",
               "data.synthetic.num_train=8", "data.synthetic.num_test=4", "data.synthetic.seed=3",
               "data.synthetic.image_size=32", "model.num_classes=6", "data.synthetic.num_classes=6",
               f"output.root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2 and str(root) in err and "Traceback" not in err, err
    assert snapshot(root) == before


# -- 5b/5c. launch/demo.sh ------------------------------------------------------------------------
DEMO_SMALL = ["--", "data.synthetic.num_train=4", "data.synthetic.num_test=2", "data.synthetic.image_size=32"]


@pytest.fixture
def demo(tmp_path):
    """demo.sh with training and evaluation stubbed out (the data step is real)."""
    launch = tmp_path / "launch"
    launch.mkdir()
    shutil.copy2(ROOT / "launch" / "demo.sh", launch / "demo.sh")
    (launch / "deepspeed.sh").write_text(
        "#!/usr/bin/env bash\n"
        'for a in "$@"; do case "$a" in output.root=*) root=${a#output.root=} ;; esac; done\n'
        'mkdir -p "$root/train/checkpoints" && touch "$root/train/metrics.jsonl"\n'
        'echo "$*" >> "$root/train/ds-calls"\n')
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1 $2 $3" == "-m sst_dist.cli eval" ]]; then\n'
        '  prev=; ow=0\n'
        '  for a in "$@"; do [[ $prev == --out ]] && out=$a; [[ $a == --overwrite ]] && ow=1; prev=$a; done\n'
        '  [[ $ow == 1 || ! -e "$out/ap.json" ]] || { echo "$out/ap.json: earlier result" >&2; exit 2; }\n'
        '  mkdir -p "$out" && touch "$out/ap.json" && echo "stub eval $out"; exit 0\n'
        'fi\n'
        f'exec {sys.executable} "$@"\n')
    for f in (launch / "deepspeed.sh", venv / "python"):
        f.chmod(0o755)
    env = {**os.environ, "SST_ROOT": str(ROOT), "SST_VENV": str(tmp_path / "venv"), "DS_ACCELERATOR": "cpu"}
    env.pop("DEMO_DIR", None)
    env.pop("MASTER_PORT", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(launch / "demo.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=300)
    return run


def test_demo_validates_every_argument_before_any_work(tmp_path, demo):
    out = tmp_path / "demo"
    r = demo("--out", str(out), "--port", "70000", *DEMO_SMALL)
    assert r.returncode == 2 and "--port" in r.stderr, r.stderr
    assert not out.exists()
    r = demo("--out", str(out), "--", "data.synthetic.num_train=-1")
    assert r.returncode == 2 and "num_train" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_demo_refuses_a_lone_split_instead_of_overwriting_it(tmp_path, demo):
    out = tmp_path / "demo"
    data = out / "data"
    assert main(["shards", "synthetic", "--out", str(data), "--n-train", "4", "--n-test", "0",
                 "--image-size", "32", "--num-classes", "10", *QUIET]) == 0
    before = snapshot(out)
    r = demo("--out", str(out), *DEMO_SMALL)
    assert r.returncode == 2 and "--fresh" in r.stderr and str(data) in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert snapshot(out) == before


def test_demo_appends_each_evaluation_to_the_eval_log(tmp_path, demo):
    out = tmp_path / "demo"
    for _ in range(2):
        r = demo("--out", str(out), *DEMO_SMALL)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    lines = (out / "train" / "eval.log").read_text().splitlines()
    evals = [x for x in lines if x.startswith("stub eval")]
    assert evals == [f"stub eval {out / 'train' / 'eval'}"] * 2, lines  # its own result, replaced
    assert sum(x.startswith("# evaluation of") for x in lines) == 2, lines


def test_shards_synthetic_stopped_by_sigterm_rolls_back(tmp_path):
    """``timeout`` and SLURM stop with SIGTERM: the conversion unwinds as on Ctrl-C (exit 143) and
    removes what it had started, here the output folder it created."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sst_dist.cli", "shards", "synthetic", "--out", str(out),
                             "--n-train", "4000", "--n-test", "4", "--image-size", "32", *QUIET],
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    deadline = time.time() + 120
    while not (out.is_dir() and any(p.name.endswith(".tmp") for p in out.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the conversion ended before it was stopped"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert not out.exists()
