"""Converters: dataset order and class indices (DESIGN §4), re-encoding, errors, end-to-end shards."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from fixtures_data import make_coco_fixture, make_jsonl_fixture, make_list_fixture, make_voc_fixture
from PIL import Image

from data_shards import format as fmt
from data_shards.coco import read_coco
from data_shards.convert import BadImagesError, convert_labeled, convert_split, jpeg_bytes
from data_shards.jsonl import read_jsonl
from data_shards.listfmt import read_list
from data_shards.voc import VOC_CLASSES, read_voc


def _read_shards(shard_dir, split):
    info = fmt.read_info(shard_dir, split)
    urls = [str(shard_dir / s["name"]) for s in info["shards"]]
    return info, list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _no_outputs(out):
    names = [p.name for p in out.rglob("*")] if out.exists() else []
    assert not [n for n in names if n.endswith((".tar", ".json", ".idx", ".npy", ".tmp"))], names


def test_coco_hand_written_order_and_classes(tmp_path):
    doc = {
        "images": [{"id": 30, "file_name": "c.jpg"}, {"id": 10, "file_name": "a.jpg"},
                   {"id": 20, "file_name": "b.jpg"}],
        "categories": [{"id": 5, "name": "five"}, {"id": 2, "name": "two"}],
        "annotations": [{"id": 1, "image_id": 10, "category_id": 5},
                        {"id": 2, "image_id": 30, "category_id": 2},
                        {"id": 3, "image_id": 30, "category_id": 5, "iscrowd": 1}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    data = read_coco(ann, tmp_path)
    assert data.classes == ["two", "five"]
    assert [p.name for p in data.images] == ["c.jpg", "a.jpg", "b.jpg"]
    np.testing.assert_array_equal(data.labels, [[1, 1], [-1, 1], [-1, -1]])


def test_coco_fixture_end_to_end_with_workers(tmp_path):
    fx = make_coco_fixture(tmp_path, n_images=12)
    data = read_coco(fx["annotations"], fx["images"])
    assert data.classes == fx["classes"] == ["person", "car", "cat", "surfboard", "toothbrush"]
    assert [p.name for p in data.images] == fx["file_names"]
    np.testing.assert_array_equal(data.labels, fx["labels"])
    assert (data.labels[3] == -1).all()  # the fixture leaves every 4th image unannotated
    out = tmp_path / "shards"
    info = convert_labeled(data, out, "coco", "train", num_workers=2, shard_bytes=6000, progress=False)
    assert len(info["shards"]) > 1
    info2, got = _read_shards(out, "train")
    assert info2 == info and info["classes"] == fx["classes"]
    assert [fmt.decode_index(g["idx"]) for g in got] == list(range(12))
    for i, g in enumerate(got):
        np.testing.assert_array_equal(fmt.decode_labels(g["lbl"], 5), fx["labels"][i])
        src = fx["images"] / fx["file_names"][i]
        if src.suffix == ".jpg":
            assert g["jpg"] == src.read_bytes(), "JPEG bytes must be kept as is"
        else:  # the PNG is re-encoded: a JPEG showing the same picture
            assert g["jpg"][:3] == b"\xff\xd8\xff"
            a = np.asarray(Image.open(io.BytesIO(g["jpg"])), dtype=float)
            b = np.asarray(Image.open(src).convert("RGB"), dtype=float)
            assert a.shape == b.shape and np.abs(a - b).mean() < 40
    np.testing.assert_array_equal(np.load(fmt.labels_path(out, "coco", "train")), fx["labels"])


def test_voc_order_classes_and_difficult(tmp_path):
    fx = make_voc_fixture(tmp_path, n_images=12)
    assert VOC_CLASSES == sorted(VOC_CLASSES) and len(VOC_CLASSES) == 20
    for split in ("trainval", "test"):
        data = read_voc(fx["root"], split)
        assert [p.stem for p in data.images] == fx["splits"][split]["names"]
        np.testing.assert_array_equal(data.labels, fx["splits"][split]["labels"])
    first = read_voc(fx["root"], "trainval").labels[0]
    assert first[VOC_CLASSES.index("cow")] == -1  # only difficult cows: ignored
    assert first[VOC_CLASSES.index("dog")] == 1
    assert (first == 1).sum() == 1


def test_list_format(tmp_path):
    fx = make_list_fixture(tmp_path, n_images=10, num_classes=7)
    data = read_list(fx["image_list"], fx["labels_json"], fx["images"], class_names=fx["class_file"])
    assert data.classes == fx["classes"]
    assert [str(p.relative_to(fx["images"])) for p in data.images] == fx["names"]
    np.testing.assert_array_equal(data.labels, fx["labels"])
    by_count = read_list(fx["image_list"], fx["labels_json"], fx["images"], num_classes=7)
    assert by_count.classes[0] == "class_0"
    np.testing.assert_array_equal(by_count.labels, fx["labels"])
    with pytest.raises(ValueError, match="class index 6 outside"):
        read_list(fx["image_list"], fx["labels_json"], fx["images"], num_classes=6)
    with pytest.raises(ValueError, match="num_classes"):
        read_list(fx["image_list"], fx["labels_json"], fx["images"])
    mapping = json.loads(fx["labels_json"].read_text())
    del mapping[fx["names"][4]]
    fx["labels_json"].write_text(json.dumps(mapping))
    with pytest.raises(ValueError, match=rf"image_list.txt:5: .*{fx['names'][4]}"):
        read_list(fx["image_list"], fx["labels_json"], fx["images"], num_classes=7)


def test_jsonl_format_and_png_reencoding(tmp_path):
    fx = make_jsonl_fixture(tmp_path, n_images=8)
    data = read_jsonl(fx["jsonl"], fx["class_file"])
    assert data.classes == fx["classes"] and list(data.images) == fx["paths"]
    np.testing.assert_array_equal(data.labels, fx["labels"])
    assert (data.labels[3] == -1).all()
    out = tmp_path / "shards"
    convert_labeled(data, out, "mine", "test", num_workers=0, progress=False)
    _, got = _read_shards(out, "test")
    assert got[2]["jpg"][:3] == b"\xff\xd8\xff" and fx["paths"][2].suffix == ".png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.jpg", "labels": ["nope"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: unknown class name 'nope'"):
        read_jsonl(bad, fx["class_file"])


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        read_coco(tmp_path / "nothere.json", tmp_path)
    fx = make_voc_fixture(tmp_path, n_images=6)
    with pytest.raises(FileNotFoundError, match="ImageSets/Main/val.txt"):
        read_voc(fx["root"], "val")
    name = fx["splits"]["test"]["names"][1]
    (fx["root"] / "Annotations" / f"{name}.xml").unlink()
    with pytest.raises(FileNotFoundError, match=f"Annotations/{name}.xml"):
        read_voc(fx["root"], "test")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_list(tmp_path / "missing.txt", tmp_path / "x.json", tmp_path, num_classes=3)
    with pytest.raises(FileNotFoundError, match="JSONL file not found"):
        read_jsonl(tmp_path / "no.jsonl", ["a"])
    with pytest.raises(FileNotFoundError, match="image not found: .*nope.jpg"):
        jpeg_bytes(tmp_path / "nope.jpg")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image .*garbage.png"):
        jpeg_bytes(garbage)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images_all_reported_then_fail_or_skip(tmp_path, workers):
    fx = make_coco_fixture(tmp_path, n_images=10)
    data = read_coco(fx["annotations"], fx["images"])
    missing, cut = data.images[7], data.images[2]
    missing.unlink()
    cut.write_bytes(cut.read_bytes()[:40])
    out = tmp_path / "shards"
    with pytest.raises(BadImagesError, match=rf"2 of 10 images .*#2 .*{cut.name}.*#7 .*{missing.name}"):
        convert_labeled(data, out, "coco", "train", num_workers=workers, shard_bytes=3000, progress=False)
    _no_outputs(out)
    info = convert_labeled(data, out, "coco", "train", num_workers=workers, shard_bytes=3000,
                           progress=False, bad_images="skip")
    assert info["num_samples"] == 8 and info["num_skipped"] == 2
    assert [(b["index"], b["image"]) for b in info["skipped_images"]] == [(2, str(cut)), (7, str(missing))]
    keep = [i for i in range(10) if i not in (2, 7)]
    np.testing.assert_array_equal(np.load(out / info["labels"]), fx["labels"][keep])
    _, got = _read_shards(out, "train")
    assert got[2]["jpg"] == data.images[3].read_bytes()  # renumbered in order, JPEG kept as is


@pytest.mark.parametrize("workers", [0, 2])
def test_exception_in_sample_stream_leaves_nothing(tmp_path, workers):
    fx = make_coco_fixture(tmp_path, n_images=12)
    data = read_coco(fx["annotations"], fx["images"])

    def stream():
        for sample in data:
            if sample[0] == 10:
                raise RuntimeError("stream broke")
            yield sample

    out = tmp_path / "shards"
    with pytest.raises(RuntimeError, match="stream broke"):
        convert_split(stream(), data.classes, out, "coco", "train", num_workers=workers,
                      shard_bytes=3000, progress=False)
    _no_outputs(out)


def test_cli_converts_and_verifies(tmp_path, capsys):
    from sst_dist.cli import main

    fx = make_list_fixture(tmp_path, n_images=6, num_classes=4)
    out = tmp_path / "shards"
    rc = main(["shards", "list", "--image-list", str(fx["image_list"]), "--labels-json",
               str(fx["labels_json"]), "--images", str(fx["images"]), "--classes", str(fx["class_file"]),
               "--out", str(out), "--split", "train", "--workers", "0", "--no-progress"])
    assert rc == 0
    assert fmt.read_info(out, "train")["classes"] == fx["classes"]
    assert main(["shards", "verify", str(out)]) == 0
    shard = out / "vg200-train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    assert main(["shards", "verify", str(out)]) == 1
    assert "sha256" in capsys.readouterr().err


@pytest.mark.parametrize("fmt_name", ["coco", "voc", "list", "jsonl", "synthetic", "verify"])
def test_cli_help(fmt_name, capsys):
    from sst_dist.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["shards", fmt_name, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from sst_dist.cli import main

    fx = make_jsonl_fixture(tmp_path, n_images=3)
    fx["jsonl"].write_text(fx["jsonl"].read_text() + '{"image": "img/000.jpg", "labels": null}\n')
    out = tmp_path / "shards"
    args = ["shards", "jsonl", "--jsonl", str(fx["jsonl"]), "--classes", str(fx["class_file"]),
            "--out", str(out), "--split", "train", "--workers", "0", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.jsonl:4" in err and "Traceback" not in err
    fx["paths"][1].write_bytes(b"broken")
    fx["jsonl"].write_text("\n".join(fx["jsonl"].read_text().splitlines()[:3]) + "\n")
    assert main(args) == 2 and "1 of 3 images cannot be used" in capsys.readouterr().err
    assert main(args + ["--bad-images", "skip"]) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out
    assert main(args + ["--bad-images", "skip"]) == 2  # an existing split needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
