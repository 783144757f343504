"""VG-200 style list format -> :class:`LabeledSplit` (DESIGN §4).

An image list file (one image name per line, relative to the image directory) fixes the order;
a JSON object maps each image name to its list of 0-based class indices. Class names come from a
names file (one a line) or, without one, ``num_classes`` gives ``class_0 ...``.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_shards.convert import LabeledSplit, labels_from_indices, read_class_names


def read_list(image_list: str | Path, labels_json: str | Path, image_dir: str | Path,
              class_names: str | Path | None = None, num_classes: int | None = None) -> LabeledSplit:
    """Order of ``image_list``; labels from ``labels_json``; paths under ``image_dir``."""
    list_path, json_path = Path(image_list), Path(labels_json)
    for what, p in (("image list", list_path), ("labels JSON", json_path)):
        if not p.is_file():
            raise FileNotFoundError(f"{what} file not found: {p}")
    if class_names is not None:
        classes = read_class_names(class_names)
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"num_classes={num_classes} but {class_names} lists {len(classes)} names")
    elif num_classes is not None and num_classes > 0:
        classes = [f"class_{i}" for i in range(num_classes)]
    else:
        raise ValueError("give class_names (a names file) or a positive num_classes")
    names = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
    mapping = json.loads(json_path.read_text())
    if not isinstance(mapping, dict):
        raise ValueError(f"{json_path}: expected a JSON object image name -> class indices")
    missing = [n for n in names if n not in mapping]
    if missing:
        raise KeyError(f"{json_path} has no labels for image {missing[0]!r} (from {list_path}; "
                       f"{len(missing)} missing)")
    per_image = [mapping[n] for n in names]
    labels = labels_from_indices(per_image, len(classes), str(json_path))
    return LabeledSplit(classes, [Path(image_dir) / n for n in names], labels)
