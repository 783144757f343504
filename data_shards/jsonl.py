"""JSON-lines format -> :class:`LabeledSplit`: the simplest way to bring any dataset.

Each line is ``{"image": path, "labels": [...]}``; order is line order. Labels are class names
(strings) or 0-based indices (ints). Relative image paths resolve against ``image_dir`` (default:
the JSONL file's directory).
"""

from __future__ import annotations

import json
from pathlib import Path

from data_shards.convert import LabeledSplit, labels_from_indices, read_class_names


def read_jsonl(jsonl_file: str | Path, class_names: str | Path | list[str],
               image_dir: str | Path | None = None) -> LabeledSplit:
    """Images and labels of ``jsonl_file``; ``class_names`` is a names file or a list."""
    path = Path(jsonl_file)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    classes = list(class_names) if isinstance(class_names, list) else read_class_names(class_names)
    index = {c: i for i, c in enumerate(classes)}
    base = Path(image_dir) if image_dir is not None else path.parent
    images, per_image = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
            image, labels = record["image"], record["labels"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{where}: expected {{\"image\": ..., \"labels\": [...]}}: {err}") from err
        idx = []
        for lab in labels:
            if isinstance(lab, str):
                if lab not in index:
                    raise ValueError(f"{where}: unknown class name {lab!r}")
                idx.append(index[lab])
            elif isinstance(lab, int) and not isinstance(lab, bool):
                idx.append(lab)
            else:
                raise ValueError(f"{where}: label {lab!r} is neither a class name nor an index")
        images.append(base / image)
        per_image.append(idx)
    return LabeledSplit(classes, images, labels_from_indices(per_image, len(classes), str(path)))
