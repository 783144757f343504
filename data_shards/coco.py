"""COCO instances JSON -> :class:`LabeledSplit` in the protocol's order (DESIGN §4).

Images follow pycocotools' ``coco.imgs`` order (the annotation file's image list); class index is
the rank of the category id, ascending (80 classes for COCO 2014). Every annotation counts,
crowd ones included, as in the reference; an image without annotations is all -1.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from data_shards.convert import LabeledSplit, labels_from_indices


def read_coco(annotation_file: str | Path, image_dir: str | Path, quiet: bool = True) -> LabeledSplit:
    """Images (paths under ``image_dir``) and full labels of a COCO instances file."""
    from pycocotools.coco import COCO

    ann = Path(annotation_file)
    if not ann.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann}")
    sink = io.StringIO() if quiet else None
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        coco = COCO(str(ann))
    cat_ids = sorted(coco.cats)
    if not cat_ids:
        raise ValueError(f"{ann}: no categories")
    rank = {cid: i for i, cid in enumerate(cat_ids)}
    classes = [coco.cats[c]["name"] for c in cat_ids]
    image_ids = list(coco.imgs)
    per_image = []
    for img_id in image_ids:
        anns = coco.imgToAnns.get(img_id, [])
        try:
            per_image.append(sorted({rank[a["category_id"]] for a in anns}))
        except KeyError as err:
            raise ValueError(f"{ann}: image {img_id} has an annotation with unknown category {err}") from err
    images = [Path(image_dir) / coco.imgs[i]["file_name"] for i in image_ids]
    return LabeledSplit(classes, images, labels_from_indices(per_image, len(classes), str(ann)))
