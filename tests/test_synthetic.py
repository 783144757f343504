"""Synthetic scenes: deterministic bytes, valid COCO, visible objects, structured co-occurrence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_shards import format as fmt
from data_shards.coco import read_coco
from data_shards.synthetic import (
    COLOURS,
    MAX_CLASSES,
    class_appearance,
    class_names,
    generate_scenes,
    scene_classes,
)


def _all_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_any_workers(tmp_path):
    generate_scenes(tmp_path / "a", 12, 5, image_size=64, seed=3)
    generate_scenes(tmp_path / "b", 12, 5, image_size=64, seed=3, num_workers=2)
    generate_scenes(tmp_path / "c", 12, 5, image_size=64, seed=4)
    a, b, c = (_all_bytes(tmp_path / d) for d in "abc")
    assert len(a) == 12 + 5 + 2
    assert a == b
    assert a.keys() == c.keys() and a["train/train_0000000.jpg"] != c["train/train_0000000.jpg"]


def test_coco_path_and_annotations(tmp_path):
    paths = generate_scenes(tmp_path, 30, 10, num_classes=9, image_size=64, seed=0)
    ann, image_dir = paths["train"]
    data = read_coco(ann, image_dir)
    assert data.classes == class_names(9) and len(data) == 30
    doc = json.loads(ann.read_text())
    per_image = {}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w >= 8
        per_image.setdefault(a["image_id"], []).append(a["category_id"] - 1)
    assert all(2 <= len(v) <= 5 for v in per_image.values()) and len(per_image) == 30
    for i, img in enumerate(doc["images"]):  # labels are exactly the annotated classes
        assert set(np.flatnonzero(data.labels[i] == 1)) == set(per_image[img["id"]])
    assert Image.open(data.images[0]).size == (64, 64)
    assert len(read_coco(*paths["test"])) == 10


def test_top_object_is_drawn_in_its_colour(tmp_path):
    ann, image_dir = generate_scenes(tmp_path, 60, 0, image_size=96, seed=1)["train"]
    doc = json.loads(ann.read_text())
    last = {}
    for a in doc["annotations"]:
        last[a["image_id"]] = a  # the last object of an image is drawn on top of the others
    checked = 0
    for img in doc["images"]:
        a = last[img["id"]]
        shape, colour, texture = class_appearance(a["category_id"] - 1)
        if texture != "solid" or shape == "ring":
            continue
        x, y, w, h = a["bbox"]
        pixels = np.asarray(Image.open(image_dir / img["file_name"]).convert("RGB"), dtype=float)
        centre = pixels[int(y + h / 2) - 1 : int(y + h / 2) + 1, int(x + w / 2) - 1 : int(x + w / 2) + 1]
        assert np.abs(centre.mean(axis=(0, 1)) - np.array(COLOURS[colour])).max() < 60
        checked += 1
    assert checked >= 5


def test_cooccurrence_is_structured(tmp_path):
    ann, image_dir = generate_scenes(tmp_path, 400, 0, num_classes=12, image_size=32, seed=0)["train"]
    pos = (read_coco(ann, image_dir).labels == 1).astype(float)
    rng = np.random.default_rng(0)
    independent = np.stack([rng.permutation(col) for col in pos.T], axis=1)  # same marginals

    def mean_abs_offdiag_corr(x):
        corr = np.corrcoef(x.T)
        return np.abs(corr[~np.eye(len(corr), dtype=bool)]).mean()

    assert mean_abs_offdiag_corr(pos) > 0.15
    assert mean_abs_offdiag_corr(independent) < 0.08
    # pairs of one scene's classes co-occur more often than chance, pairs of different scenes less
    prob = pos.mean(axis=0)
    lift = (pos.T @ pos / len(pos)) / np.outer(prob, prob)
    same = np.zeros((12, 12), dtype=bool)
    for members in scene_classes(12, 4, seed=0):
        same[np.ix_(members, members)] = True
    assert lift[same & ~np.eye(12, dtype=bool)].mean() > 1.3
    assert lift[~same].mean() < 0.6


def test_appearance_and_arguments():
    looks = {class_appearance(k) for k in range(MAX_CLASSES)}
    assert len(looks) == MAX_CLASSES
    assert len(set(class_names(MAX_CLASSES))) == MAX_CLASSES
    with pytest.raises(ValueError, match="num_classes"):
        generate_scenes("/nonexistent", 1, 1, num_classes=MAX_CLASSES + 1)
    with pytest.raises(ValueError, match="image_size"):
        generate_scenes("/nonexistent", 1, 1, image_size=8)


def test_cli_synthetic_writes_both_splits(tmp_path):
    from sst_dist.cli import main

    out = tmp_path / "shards"
    rc = main(["shards", "synthetic", "--out", str(out), "--n-train", "16", "--n-test", "6",
               "--image-size", "48", "--num-classes", "6", "--workers", "0", "--no-progress"])
    assert rc == 0
    train, test = fmt.read_info(out, "train", num_classes=6), fmt.read_info(out, "test", num_classes=6)
    assert (train["num_samples"], test["num_samples"]) == (16, 6)
    assert train["classes"] == class_names(6)
    assert main(["shards", "verify", str(out)]) == 0
