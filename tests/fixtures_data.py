"""Tiny COCO / VOC / list / JSONL datasets with real images, for converter and loader tests.

Each ``make_*_fixture(tmp_path, n_images, seed)`` writes a dataset under ``tmp_path`` and returns
a dict with its paths, the class names and the expected full label matrix (int8, +1/-1, dataset
order), computed here by plain loops independently of ``data_shards``. Images are real JPEGs
(one PNG in COCO and JSONL, to exercise re-encoding) with random colour blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

VOC_NAMES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]


def make_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 32)) -> Path:
    """A real image file (format from the suffix): a few random colour blocks on noise."""
    w, h = size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
        arr[y : y + h // 2, x : x + w // 2] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _expected(per_image: list[set[int]], num_classes: int) -> np.ndarray:
    labels = np.full((len(per_image), num_classes), -1, dtype=np.int8)
    for i, classes in enumerate(per_image):
        for c in classes:
            labels[i, c] = 1
    return labels


def make_coco_fixture(tmp_path: Path, n_images: int = 12, seed: int = 0) -> dict:
    """COCO instances JSON with unsorted, gappy category ids, shuffled image ids, a PNG image
    (index 1), and images without annotations (every 4th); keys: annotations, images, classes,
    labels, file_names, cat_ids."""
    rng = np.random.default_rng(seed)
    root = Path(tmp_path) / "coco"
    image_dir = root / "images"
    cat_ids = [90, 3, 17, 1, 42]  # class index = rank: 1->0, 3->1, 17->2, 42->3, 90->4
    names = {90: "toothbrush", 3: "car", 17: "cat", 1: "person", 42: "surfboard"}
    rank = {cid: sorted(cat_ids).index(cid) for cid in cat_ids}
    images, annotations, per_image, file_names = [], [], [], []
    image_ids = rng.permutation(np.arange(100, 100 + n_images)).tolist()  # file order != id order
    for i, img_id in enumerate(image_ids):
        suffix = "png" if i == 1 else "jpg"
        name = f"COCO_{img_id:012d}.{suffix}"
        make_image(image_dir / name, rng)
        images.append({"id": int(img_id), "file_name": name, "width": 40, "height": 32})
        file_names.append(name)
        classes: set[int] = set()
        if i % 4 != 3:
            for _ in range(int(rng.integers(1, 4))):
                cid = int(rng.choice(cat_ids))
                annotations.append({"id": len(annotations) + 1, "image_id": int(img_id), "category_id": cid,
                                    "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0,
                                    "iscrowd": int(rng.random() < 0.2)})
                classes.add(rank[cid])
        per_image.append(classes)
    cats = [{"id": c, "name": names[c], "supercategory": "x"} for c in cat_ids]
    ann = root / "instances_train.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return {"annotations": ann, "images": image_dir, "classes": [names[c] for c in sorted(cat_ids)],
            "labels": _expected(per_image, len(cat_ids)), "file_names": file_names, "cat_ids": cat_ids}


def _voc_xml(name: str, objects: list[tuple[str, int]]) -> str:
    objs = "".join(
        f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{diff}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax>"
        f"<ymax>9</ymax></bndbox></object>"
        for cls, diff in objects
    )
    return (f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename>"
            f"<size><width>40</width><height>32</height><depth>3</depth></size>{objs}</annotation>")


def make_voc_fixture(tmp_path: Path, n_images: int = 12, seed: int = 0) -> dict:
    """VOC2007 tree; image sets list names out of sorted order; some objects are difficult and
    image 0 of trainval has a class present only as difficult. Keys: root, classes, splits
    {"trainval"|"test": {"names", "labels"}}."""
    rng = np.random.default_rng(seed)
    root = Path(tmp_path) / "VOC2007"
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    names = [f"{n:06d}" for n in rng.choice(np.arange(1, 10 * n_images), n_images, replace=False)]
    n_test = max(1, n_images // 3)
    splits = {"trainval": names[n_test:], "test": names[:n_test]}
    out = {"root": root, "classes": list(VOC_NAMES), "splits": {}}
    for split, members in splits.items():
        per_image = []
        for j, name in enumerate(members):
            make_image(root / "JPEGImages" / f"{name}.jpg", rng)
            objects = [(VOC_NAMES[int(rng.integers(20))], int(rng.random() < 0.3))
                       for _ in range(int(rng.integers(1, 4)))]
            if split == "trainval" and j == 0:  # 'cow' only difficult, 'dog' both ways
                objects = [("cow", 1), ("dog", 1), ("dog", 0)]
            (root / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, objects))
            per_image.append({VOC_NAMES.index(c) for c, d in objects if d == 0})
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in members))
        out["splits"][split] = {"names": members, "labels": _expected(per_image, 20)}
    return out


def make_list_fixture(tmp_path: Path, n_images: int = 12, num_classes: int = 7, seed: int = 0) -> dict:
    """VG-200 style: image list (subdirectory names), labels JSON (with an extra unlisted image),
    class-names file. Keys: image_list, labels_json, images, class_file, classes, labels, names."""
    rng = np.random.default_rng(seed)
    root = Path(tmp_path) / "vg"
    names = [f"part{i % 2}/{int(v)}.jpg" for i, v in enumerate(rng.permutation(n_images) + 1000)]
    mapping, per_image = {}, []
    for name in names:
        make_image(root / "images" / name, rng)
        classes = sorted({int(c) for c in rng.integers(0, num_classes, int(rng.integers(1, 4)))})
        mapping[name] = classes
        per_image.append(set(classes))
    mapping["unlisted/999.jpg"] = [0]
    (root / "image_list.txt").write_text("".join(f"{n}\n" for n in names))
    (root / "labels.json").write_text(json.dumps(mapping))
    classes = [f"thing{c}" for c in range(num_classes)]
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return {"image_list": root / "image_list.txt", "labels_json": root / "labels.json",
            "images": root / "images", "class_file": root / "classes.txt", "classes": classes,
            "labels": _expected(per_image, num_classes), "names": names}


def make_jsonl_fixture(tmp_path: Path, n_images: int = 12, seed: int = 0) -> dict:
    """JSONL with labels given as names on even lines and indices on odd ones, a PNG on line 2,
    one image with no labels. Keys: jsonl, class_file, classes, labels, paths."""
    rng = np.random.default_rng(seed)
    root = Path(tmp_path) / "jsonl"
    classes = ["alpha", "beta", "gamma", "delta"]
    lines, per_image, paths = [], [], []
    for i in range(n_images):
        rel = f"img/{i:03d}.{'png' if i == 2 else 'jpg'}"
        make_image(root / rel, rng)
        chosen = [] if i == 3 else sorted({int(c) for c in rng.integers(0, 4, int(rng.integers(1, 3)))})
        labels = [classes[c] for c in chosen] if i % 2 == 0 else chosen
        lines.append(json.dumps({"image": rel, "labels": labels}))
        per_image.append(set(chosen))
        paths.append(root / rel)
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return {"jsonl": root / "data.jsonl", "class_file": root / "classes.txt", "classes": classes,
            "labels": _expected(per_image, 4), "paths": paths}
