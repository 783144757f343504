"""COCO instances JSON -> :class:`LabeledSplit` in the protocol's order (DESIGN §4).

Images follow the annotation file's image list (pycocotools' ``coco.imgs`` order); class index is
the rank of the category id, ascending (80 classes for COCO 2014). Every annotation counts,
crowd ones included, as in the reference; an image without annotations is all -1.

The file is read directly rather than through pycocotools, which silently keeps the last of two
images or categories with the same id (and so mislabels): here every duplicate id or name, an
annotation of an unknown image or category, two images with the same file (as the JSONL, list
and VOC converters refuse an image listed twice), a wrong type or a repeated JSON key is an
error naming the file and the record.
"""

from __future__ import annotations

from pathlib import Path

from data_shards.convert import LabeledSplit, image_under, labels_from_indices, load_json, read_text


def _records(data: dict, key: str, ann: Path) -> list[dict]:
    records = data.get(key)
    if not isinstance(records, list):
        raise ValueError(f"{ann}: '{key}' must be a list, got {type(records).__name__}")
    for k, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{ann}: {key}[{k}] must be an object, got {type(r).__name__}")
    return records


def _int_id(record: dict, field: str, where: str) -> int:
    value = record.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: {field} must be an integer, got {value!r:.40}")
    return value


def read_coco(annotation_file: str | Path, image_dir: str | Path,
              allow_outside: bool = False) -> LabeledSplit:
    """Images (paths under ``image_dir``) and full labels of a COCO instances file."""
    ann = Path(annotation_file)
    if not ann.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann}")
    data = load_json(read_text(ann), str(ann))
    if not isinstance(data, dict):
        raise ValueError(f"{ann}: top level must be an object with images, annotations, categories")
    rank: dict[int, int] = {}
    names: dict[int, str] = {}
    for k, cat in enumerate(_records(data, "categories", ann)):
        where = f"{ann}: categories[{k}]"
        cid, name = _int_id(cat, "id", where), cat.get("name")
        if cid in names:
            raise ValueError(f"{where}: category id {cid} appears twice")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: category {cid} has no name")
        if name in names.values():
            raise ValueError(f"{where}: category name {name!r} appears twice")
        names[cid] = name
    if not names:
        raise ValueError(f"{ann}: no categories")
    cat_ids = sorted(names)
    rank = {cid: i for i, cid in enumerate(cat_ids)}
    images, per_image, row = [], [], {}
    first: dict[Path, tuple[int, int]] = {}  # image path -> (record number, id) of its first use
    for k, img in enumerate(_records(data, "images", ann)):
        where = f"{ann}: images[{k}]"
        img_id = _int_id(img, "id", where)
        if img_id in row:
            raise ValueError(f"{where}: image id {img_id} appears twice (also images[{row[img_id]}])")
        row[img_id] = k
        path = image_under(image_dir, img.get("file_name"), f"{where} (id {img_id})", allow_outside)
        if path in first:
            k0, id0 = first[path]
            raise ValueError(f"{where}: file_name {img.get('file_name')!r} (id {img_id}) is the same "
                             f"image as images[{k0}] (id {id0})")
        first[path] = (k, img_id)
        images.append(path)
        per_image.append(set())
    for k, a in enumerate(_records(data, "annotations", ann)):
        where = f"{ann}: annotations[{k}]"
        img_id, cid = _int_id(a, "image_id", where), _int_id(a, "category_id", where)
        if img_id not in row:
            raise ValueError(f"{where}: image_id {img_id} is not in 'images'")
        if cid not in rank:
            raise ValueError(f"{where}: category_id {cid} is not in 'categories'")
        per_image[row[img_id]].add(rank[cid])
    classes = [names[c] for c in cat_ids]
    return LabeledSplit(classes, images, labels_from_indices([sorted(p) for p in per_image], len(classes)))
