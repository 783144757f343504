"""Pascal VOC 2007 -> :class:`LabeledSplit` in the protocol's order (DESIGN §4).

Images follow ``ImageSets/Main/{split}.txt``; the 20 classes are alphabetical. Objects marked
difficult are skipped, so a class present in an image only as difficult objects is -1 there:
this is what the reference ``datasets/voc2007.py`` does, and the published numbers use it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from data_shards.convert import LabeledSplit, labels_from_indices

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]


def _classes_of(xml_path: Path, index: dict[str, int]) -> list[int]:
    if not xml_path.is_file():
        raise FileNotFoundError(f"VOC annotation not found: {xml_path}")
    root = ET.parse(xml_path).getroot()
    found = set()
    for obj in root.iter("object"):
        difficult = obj.findtext("difficult", default="0").strip()
        if difficult == "1":
            continue
        name = (obj.findtext("name") or "").strip().lower()
        if name not in index:
            raise ValueError(f"{xml_path}: unknown VOC class {name!r}")
        found.add(index[name])
    return sorted(found)


def read_voc(root: str | Path, split: str) -> LabeledSplit:
    """``root`` is the VOC2007 directory (holding Annotations/, ImageSets/, JPEGImages/)."""
    root = Path(root)
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"VOC image-set file not found: {list_file}")
    names = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    index = {c: i for i, c in enumerate(VOC_CLASSES)}
    per_image = [_classes_of(root / "Annotations" / f"{n}.xml", index) for n in names]
    images = [root / "JPEGImages" / f"{n}.jpg" for n in names]
    labels = labels_from_indices(per_image, len(VOC_CLASSES), str(list_file))
    return LabeledSplit(list(VOC_CLASSES), images, labels)
