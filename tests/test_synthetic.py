"""Synthetic scenes: deterministic bytes, valid COCO, visible objects, structured co-occurrence."""

from __future__ import annotations

import json
from pathlib import Path

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

DEBUG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "debug.yaml"
EASY_DIGEST = "2890348c70e226275a2fac5d9ff865bc1a227528c80a7e42b482168e776632d1"  # Pillow 11 JPEG


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


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_cooccurrence_is_structured(tmp_path, difficulty):
    ann, image_dir = generate_scenes(tmp_path, 400, 0, num_classes=12, image_size=32, seed=0,
                                     difficulty=difficulty)["train"]
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


def _annotations(ann):
    doc = json.loads(ann.read_text())
    return doc, [a["bbox"][2] for a in doc["annotations"]]


def test_hard_scenes_small_objects_distractors_photometric(tmp_path):
    """Hard: deterministic, smaller objects, and pixels the labels do not explain (distractors, clutter)."""
    easy_ann, easy_dir = generate_scenes(tmp_path / "e", 40, 0, num_classes=10, image_size=128,
                                         seed=2)["train"]
    hard_ann, hard_dir = generate_scenes(tmp_path / "h", 40, 0, num_classes=10, image_size=128, seed=2,
                                         difficulty="hard")["train"]
    again, _ = generate_scenes(tmp_path / "h2", 40, 0, num_classes=10, image_size=128, seed=2,
                               difficulty="hard")["train"]
    assert _all_bytes(tmp_path / "h") == {k: v for k, v in _all_bytes(tmp_path / "h2").items()}
    (_, easy_sizes), (hard_doc, hard_sizes) = _annotations(easy_ann), _annotations(hard_ann)
    assert max(hard_sizes) <= 0.24 * 128 < np.mean(easy_sizes)
    assert "difficulty=hard" in hard_doc["info"]["description"]

    def unexplained(doc, image_dir):
        """Share of strongly coloured pixels outside every labelled box (distractors, clutter)."""
        shares = []
        for img in doc["images"]:
            px = np.asarray(Image.open(image_dir / img["file_name"]).convert("RGB"), dtype=float)
            inside = np.zeros(px.shape[:2], dtype=bool)
            for a in doc["annotations"]:
                if a["image_id"] == img["id"]:
                    x, y, w, h = (int(v) for v in a["bbox"])
                    inside[y : y + h, x : x + w] = True
            vivid = (px.max(axis=2) - px.min(axis=2)) > 90
            shares.append((vivid & ~inside).sum() / max(1, vivid.sum()))
        return float(np.mean(shares))

    easy_doc = json.loads(easy_ann.read_text())
    assert unexplained(hard_doc, hard_dir) > 2 * unexplained(easy_doc, easy_dir) + 0.05
    # lighting varies from image to image, beyond what the scene backgrounds already vary (~2x)
    def brightness_spread(doc, image_dir):
        means = [np.asarray(Image.open(image_dir / i["file_name"]), float).mean() for i in doc["images"]]
        return np.std(means)

    assert brightness_spread(hard_doc, hard_dir) > 1.5 * brightness_spread(easy_doc, easy_dir)
    with pytest.raises(ValueError, match="difficulty"):
        generate_scenes(tmp_path / "x", 1, 1, difficulty="medium")


def test_easy_scenes_unchanged_by_the_difficulty_option(tmp_path):
    """The default generator still draws the same bytes as before the option (fixed digest)."""
    import hashlib

    generate_scenes(tmp_path, 3, 0, num_classes=10, image_size=64, seed=0)
    digest = hashlib.sha256((tmp_path / "train" / "train_0000002.jpg").read_bytes()).hexdigest()
    assert digest == EASY_DIGEST


def _synthetic_cfg(root, difficulty):
    from sst_dist.config import load_config

    return load_config(DEBUG, [f"data.root={root}", "data.synthetic.enabled=true",
                               "data.synthetic.num_train=8", "data.synthetic.num_test=4",
                               "data.synthetic.image_size=32", f"data.synthetic.difficulty={difficulty}",
                               "model.num_classes=6",
                               "data.synthetic.num_classes=6"])


def test_ensure_synthetic_refuses_shards_of_another_difficulty(tmp_path):
    from sst_dist.config import ConfigError
    from sst_dist.train.data import ensure_synthetic

    ensure_synthetic(_synthetic_cfg(tmp_path, "easy"))
    record = json.loads((tmp_path / "synthetic.json").read_text())
    assert record["difficulty"] == "easy" and record["n_train"] == 8
    ensure_synthetic(_synthetic_cfg(tmp_path, "easy"))  # same settings: reused
    with pytest.raises(ConfigError, match=r"synthetic.json: .*difficulty='easy', not 'hard'"):
        ensure_synthetic(_synthetic_cfg(tmp_path, "hard"))
    (tmp_path / "synthetic.json").unlink()  # shards from before the record: easy only
    ensure_synthetic(_synthetic_cfg(tmp_path, "easy"))
    with pytest.raises(ConfigError, match="predate the difficulty option"):
        ensure_synthetic(_synthetic_cfg(tmp_path, "hard"))


def test_train_cli_names_the_mismatch_and_exits_2(tmp_path, capsys):
    from sst_dist.cli import main

    out = tmp_path / "shards"
    assert main(["shards", "synthetic", "--out", str(out), "--n-train", "8", "--n-test", "4",
                 "--image-size", "32", "--num-classes", "6", "--scenes", "4", "--workers", "0",
                 "--no-progress", "--difficulty", "hard"]) == 0
    assert json.loads((out / "synthetic.json").read_text())["difficulty"] == "hard"
    rc = main(["train", str(DEBUG), f"data.root={out}", "data.synthetic.enabled=true",
               "data.synthetic.num_train=8", "data.synthetic.num_test=4",
               "data.synthetic.image_size=32", "model.num_classes=6", "data.synthetic.num_classes=6",
               f"output.root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "synthetic.json" in err and "difficulty='hard', not 'easy'" in err
