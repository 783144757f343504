"""User-facing polish of ``sst-dist shards``: duplicate images, counts, leftovers, messages, help, README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fixtures_data import make_coco_fixture, make_list_fixture, make_voc_fixture

from data_shards import format as fmt
from data_shards.coco import read_coco
from data_shards.listfmt import read_list
from data_shards.voc import read_voc
from sst_dist.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
QUIET = ["--workers", "0", "--no-progress"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def _coco_args(fx, out, *extra):
    return ["shards", "coco", "--annotations", str(fx["annotations"]), "--images", str(fx["images"]),
            "--out", str(out), "--split", "train", *QUIET, *extra]


# -- 1. the same image twice ------------------------------------------------------------------
def test_coco_refuses_two_images_with_the_same_file_name(tmp_path, capsys):
    fx = make_coco_fixture(tmp_path, n_images=4)
    doc = json.loads(fx["annotations"].read_text())
    first, second = doc["images"][0], doc["images"][2]
    second["file_name"] = "./" + first["file_name"]  # the same file, spelled differently
    fx["annotations"].write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"instances_train.json: images\[2\].*{first['file_name']}.*"
                                         rf"id {second['id']}.*images\[0\].*id {first['id']}"):
        read_coco(fx["annotations"], fx["images"])
    out = tmp_path / "shards"
    assert main(_coco_args(fx, out)) == 2
    assert "instances_train.json" in _one_line_error(capsys)


def test_list_and_voc_refuse_the_same_image_spelled_differently(tmp_path):
    fx = make_list_fixture(tmp_path, n_images=4, num_classes=5)
    mapping = json.loads(fx["labels_json"].read_text())
    mapping["./" + fx["names"][0]] = [1]
    fx["labels_json"].write_text(json.dumps(mapping))
    fx["image_list"].write_text(fx["image_list"].read_text() + "./" + fx["names"][0] + "\n")
    with pytest.raises(ValueError, match=r"image_list.txt:5: .* already on line 1"):
        read_list(fx["image_list"], fx["labels_json"], fx["images"], num_classes=5)
    vx = make_voc_fixture(tmp_path, n_images=6)
    sets = vx["root"] / "ImageSets" / "Main" / "test.txt"
    names = vx["splits"]["test"]["names"]
    sets.write_text("\n".join(names + ["./" + names[0]]) + "\n")
    with pytest.raises(ValueError, match=rf"test.txt:{len(names) + 1}: .* already on line 1"):
        read_voc(vx["root"], "test")


# -- 2. synthetic counts ----------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--n-train", "0"), ("--n-train", "-3"), ("--n-test", "-1")])
def test_synthetic_refuses_empty_or_negative_counts(tmp_path, capsys, flag, value):
    out = tmp_path / "syn"
    args = ["shards", "synthetic", "--out", str(out), "--n-train", "4", "--n-test", "2",
            "--image-size", "32", "--num-classes", "4", *QUIET]
    args[args.index(flag) + 1] = value
    assert main(args) == 2
    assert flag in _one_line_error(capsys)
    assert not out.exists()


def test_synthetic_zero_test_split_is_documented_and_writes_train_only(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["shards", "synthetic", "--help"])
    assert re.search(r"0\s+writes\s+no\s+test\s+split", capsys.readouterr().out)
    out = tmp_path / "syn"
    assert main(["shards", "synthetic", "--out", str(out), "--n-train", "3", "--n-test", "0",
                 "--image-size", "32", "--num-classes", "4", *QUIET]) == 0
    assert fmt.find_info(out, "train") and not list(out.glob("*-test-_info.json"))


def test_synthetic_generation_errors_name_the_flags(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["shards", "synthetic", "--out", str(out), "--num-classes", "500", *QUIET]) == 2
    assert "--num-classes" in _one_line_error(capsys)
    assert main(["shards", "synthetic", "--out", str(out), "--image-size", "8", *QUIET]) == 2
    assert "--image-size" in _one_line_error(capsys)
    assert not out.exists()


# -- 3. a failed conversion leaves nothing it made --------------------------------------------
def test_failed_conversion_removes_the_output_folders_it_created(tmp_path, capsys):
    fx = make_coco_fixture(tmp_path, n_images=3)
    out = tmp_path / "shards" / "y"
    args = _coco_args(fx, out)
    args[args.index("--images") + 1] = str(tmp_path / "wrong")  # a typo in --images
    assert main(args) == 2
    _one_line_error(capsys)
    assert not (tmp_path / "shards").exists()


def test_failed_conversion_keeps_a_folder_that_was_there(tmp_path, capsys):
    fx = make_coco_fixture(tmp_path, n_images=3)
    empty, used = tmp_path / "empty", tmp_path / "used"
    empty.mkdir()
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    for out in (empty, used):
        args = _coco_args(fx, out)
        args[args.index("--images") + 1] = str(tmp_path / "wrong")
        assert main(args) == 2
        _one_line_error(capsys)
    assert empty.is_dir() and list(empty.iterdir()) == []
    assert [p.name for p in used.iterdir()] == ["notes.txt"] and (used / "notes.txt").read_text() == "mine"


# -- 4. messages name the flags ---------------------------------------------------------------
def test_existing_split_message_names_split_and_flag(tmp_path, capsys):
    fx = make_coco_fixture(tmp_path, n_images=3)
    out = tmp_path / "shards"
    assert main(_coco_args(fx, out)) == 0
    capsys.readouterr()
    assert main(_coco_args(fx, out)) == 2
    err = _one_line_error(capsys)
    assert "pass --overwrite" in err and str(out) in err
    assert re.search(r"split 'train' of dataset 'coco'", err), err


def test_list_without_classes_names_the_flags(tmp_path, capsys):
    fx = make_list_fixture(tmp_path, n_images=3, num_classes=4)
    args = ["shards", "list", "--image-list", str(fx["image_list"]), "--labels-json", str(fx["labels_json"]),
            "--images", str(fx["images"]), "--out", str(tmp_path / "o"), "--split", "train", *QUIET]
    assert main(args) == 2
    err = _one_line_error(capsys)
    assert "--classes" in err and "--num-classes" in err
    assert main(args + ["--classes", str(fx["class_file"]), "--num-classes", "9"]) == 2
    assert "--num-classes" in _one_line_error(capsys)


def test_size_limits_name_the_flags(tmp_path, capsys):
    fx = make_coco_fixture(tmp_path, n_images=3)
    assert main(_coco_args(fx, tmp_path / "a", "--shard-bytes", "0")) == 2
    assert "--shard-bytes" in _one_line_error(capsys)
    assert main(_coco_args(fx, tmp_path / "b", "--max-pixels", "10")) == 2
    assert "--max-pixels" in _one_line_error(capsys)


# -- 5. --help ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt_name", ["coco", "voc", "list", "jsonl", "synthetic", "verify"])
def test_help_documents_exit_statuses_and_worker_default(fmt_name, capsys):
    with pytest.raises(SystemExit):
        main(["shards", fmt_name, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"exit status: 0 .*2 ", out), out
    if fmt_name == "verify":
        assert re.search(r"1 .*problem", out)
    else:
        workers = out.split("options:", 1)[1].split("--workers WORKERS", 1)[1].split(" --", 1)[0]
        assert re.search(r"default \d", workers), workers


def test_verify_of_a_missing_folder_is_bad_input(tmp_path, capsys):
    assert main(["shards", "verify", str(tmp_path / "nope")]) == 2
    assert "nope" in _one_line_error(capsys)


# -- 6. README names the real files -------------------------------------------------------------
def test_readme_names_the_files_beside_the_shards():
    text = README.read_text()
    section = text.split("## Data: datasets to shards", 1)[1].split("\n## ", 1)[0]
    for name in (fmt.info_path(".", "{name}", "{split}").name, fmt.labels_path(".", "{name}", "{split}").name,
                 fmt.shard_name("{name}", "{split}", 0).replace("000000", "{NNNNNN}"), ".tar.idx"):
        assert name in section, name
    assert "are `_info.json`" not in section
