"""JSON-lines format -> :class:`LabeledSplit`: the simplest way to bring any dataset.

Each line is ``{"image": path, "labels": [...]}``; order is line order. Labels are class names
(strings) or 0-based indices (ints). Relative image paths resolve against ``image_dir`` (default:
the JSONL file's directory) and must stay under it unless ``allow_outside``. Anything ambiguous
(a labels mapping or string, null, a repeated key, the same image on two lines) is an error
naming the file and line.
"""

from __future__ import annotations

from pathlib import Path

from data_shards.convert import (
    LabeledSplit,
    class_indices,
    image_under,
    labels_from_indices,
    load_json,
    read_class_names,
    read_text,
)


def read_jsonl(jsonl_file: str | Path, class_names: str | Path | list[str],
               image_dir: str | Path | None = None, allow_outside: bool = False) -> LabeledSplit:
    """Images and labels of ``jsonl_file``; ``class_names`` is a names file or a list."""
    path = Path(jsonl_file)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    classes = list(class_names) if isinstance(class_names, list) else read_class_names(class_names)
    index = {c: i for i, c in enumerate(classes)}
    base = Path(image_dir) if image_dir is not None else path.parent
    images, per_image, first_line = [], [], {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        record = load_json(line, where)
        if not isinstance(record, dict) or "image" not in record or "labels" not in record:
            raise ValueError(f'{where}: expected {{"image": ..., "labels": [...]}}, '
                             f"got {line.strip()[:80]!r}")
        image = image_under(base, record["image"], where, allow_outside)
        if image in first_line:
            raise ValueError(f"{where}: image {record['image']!r} already on line {first_line[image]}")
        first_line[image] = lineno
        images.append(image)
        per_image.append(class_indices(record["labels"], len(classes), where, index))
    if not images:
        raise ValueError(f"{path}: no records")
    return LabeledSplit(classes, images, labels_from_indices(per_image, len(classes), str(path)))
