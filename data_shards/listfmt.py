"""VG-200 style list format -> :class:`LabeledSplit` (DESIGN §4).

An image list file (one image name per line, relative to the image directory) fixes the order;
a JSON object maps each image name to its list of 0-based class indices. Class names come from a
names file (one a line) or, without one, ``num_classes`` gives ``class_0 ...``. A name listed
twice, a repeated JSON key, labels that are not a list of in-range integers: errors naming the
file and the line or image.
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


def read_list(image_list: str | Path, labels_json: str | Path, image_dir: str | Path,
              class_names: str | Path | None = None, num_classes: int | None = None,
              allow_outside: bool = False) -> LabeledSplit:
    """Order of ``image_list``; labels from ``labels_json``; paths under ``image_dir``."""
    list_path, json_path = Path(image_list), Path(labels_json)
    for what, p in (("image list", list_path), ("labels JSON", json_path)):
        if not p.is_file():
            raise FileNotFoundError(f"{what} file not found: {p}")
    if class_names is not None:
        classes = read_class_names(class_names)
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"--num-classes (num_classes) is {num_classes} but the class names file "
                             f"{class_names} lists {len(classes)} names")
    elif num_classes is not None and num_classes > 0:
        classes = [f"class_{i}" for i in range(num_classes)]
    else:
        got = "" if num_classes is None else f" (got --num-classes {num_classes})"
        raise ValueError("no class names: pass --classes FILE (one name a line) or a positive "
                         f"--num-classes N{got}; from Python, class_names or num_classes")
    mapping = load_json(read_text(json_path), str(json_path))
    if not isinstance(mapping, dict):
        raise ValueError(f"{json_path}: expected a JSON object image name -> class indices")
    names, images, per_image, first_line = [], [], [], {}
    for lineno, line in enumerate(read_text(list_path).splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        where = f"{list_path}:{lineno}"
        image = image_under(image_dir, name, where, allow_outside)
        if image in first_line:  # the same file, however spelled ("a.jpg", "./a.jpg")
            raise ValueError(f"{where}: image {name!r} already on line {first_line[image]}")
        first_line[image] = lineno
        if name not in mapping:
            raise ValueError(f"{where}: {json_path} has no labels for image {name!r}")
        names.append(name)
        images.append(image)
        per_image.append(class_indices(mapping[name], len(classes), f"{json_path}: image {name!r}"))
    if not names:
        raise ValueError(f"{list_path}: no image names")
    return LabeledSplit(classes, images, labels_from_indices(per_image, len(classes), str(json_path)))
