"""Pascal VOC 2007 -> :class:`LabeledSplit` in the protocol's order (DESIGN §4).

Images follow ``ImageSets/Main/{split}.txt``; the 20 classes are alphabetical. Objects marked
difficult are skipped, so a class present in an image only as difficult objects is -1 there:
this is what the reference ``datasets/voc2007.py`` does, and the published numbers use it.
XML is parsed with ``defusedxml`` (no entity expansion, no external entities); malformed XML, an
object without a name or a ``difficult`` flag other than 0/1 is an error naming the file (and
line where the parser gives one), and so is an image listed twice.
"""

from __future__ import annotations

from pathlib import Path

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from data_shards.convert import LabeledSplit, image_under, labels_from_indices, read_text

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]


def _classes_of(xml_path: Path, index: dict[str, int]) -> list[int]:
    if not xml_path.is_file():
        raise FileNotFoundError(f"VOC annotation not found: {xml_path}")
    try:
        root = SafeET.parse(xml_path).getroot()
    except SafeET.ParseError as err:
        line = f":{err.position[0]}" if getattr(err, "position", None) else ""
        raise ValueError(f"{xml_path}{line}: malformed XML: {err}") from err
    except DefusedXmlException as err:
        raise ValueError(f"{xml_path}: refused XML construct: {err}") from err
    found = set()
    for k, obj in enumerate(root.iter("object")):
        where = f"{xml_path}: object {k}"
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise ValueError(f"{where}: difficult must be 0 or 1, got {difficult!r}")
        name = (obj.findtext("name") or "").strip().lower()
        if name not in index:
            raise ValueError(f"{where}: unknown VOC class {name!r}")
        if difficult == "0":
            found.add(index[name])
    return sorted(found)


def read_voc(root: str | Path, split: str, allow_outside: bool = False) -> LabeledSplit:
    """``root`` is the VOC2007 directory (holding Annotations/, ImageSets/, JPEGImages/)."""
    root = Path(root)
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"VOC image-set file not found: {list_file}")
    index = {c: i for i, c in enumerate(VOC_CLASSES)}
    first_line: dict[Path, int] = {}
    images, per_image = [], []
    for lineno, line in enumerate(read_text(list_file).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{list_file}:{lineno}"
        name = line.split()[0]
        image = image_under(root / "JPEGImages", f"{name}.jpg", where, allow_outside)
        if image in first_line:  # the same image, however spelled ("000005", "./000005")
            raise ValueError(f"{where}: image {name!r} already on line {first_line[image]}")
        first_line[image] = lineno
        xml = image_under(root / "Annotations", f"{name}.xml", where, allow_outside)
        per_image.append(_classes_of(xml, index))
        images.append(image)
    labels = labels_from_indices(per_image, len(VOC_CLASSES), str(list_file))
    return LabeledSplit(list(VOC_CLASSES), images, labels)
