"""The conversion driver shared by all converters: samples in dataset order -> one shard split.

A converter produces a :class:`LabeledSplit` (class names, images in dataset order, full label
matrix). :func:`convert_split` reads/encodes images in a pool of worker processes while the main
process writes them in order, so the shards keep the dataset order however the workers finish.
"""

from __future__ import annotations

import io
import itertools
import multiprocessing as mp
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_shards.writer import ShardWriter

ImageRef = str | Path | bytes
Sample = tuple[int, ImageRef, np.ndarray]
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class LabeledSplit:
    """One split of a dataset: ``images[i]`` has full labels ``labels[i]`` (int8 in {+1,-1})."""

    classes: list[str]
    images: Sequence[ImageRef]
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int8)
        if self.labels.shape != (len(self.images), len(self.classes)):
            raise ValueError(
                f"labels shape {self.labels.shape} != (num images {len(self.images)}, "
                f"num classes {len(self.classes)})"
            )
        if not np.isin(self.labels, (1, -1)).all():
            raise ValueError("full labels must hold only +1/-1")

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Sample]:
        for i, image in enumerate(self.images):
            yield i, image, self.labels[i]


def labels_from_indices(per_image: Sequence[Iterable[int]], num_classes: int, where: str = "") -> np.ndarray:
    """(N, C) int8 matrix, +1 at each image's class indices and -1 elsewhere."""
    labels = np.full((len(per_image), num_classes), -1, dtype=np.int8)
    rows = [i for i, idx in enumerate(per_image) for _ in idx]
    cols = [int(c) for idx in per_image for c in idx]
    if cols and (min(cols) < 0 or max(cols) >= num_classes):
        bad = next(c for c in cols if c < 0 or c >= num_classes)
        raise ValueError(f"{where}: class index {bad} outside [0, {num_classes})")
    labels[rows, cols] = 1
    return labels


def read_class_names(path: str | Path) -> list[str]:
    """Class names, one a line (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class-names file not found: {p}")
    names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class-names file {p} is empty")
    return names


def jpeg_bytes(image: ImageRef, quality: int = 95) -> bytes:
    """The image as JPEG bytes: JPEG kept as is, anything PIL reads re-encoded (RGB)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data, where = bytes(image), "<bytes>"
    else:
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        data, where = path.read_bytes(), str(path)
    if data[:3] == JPEG_MAGIC:
        return data
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            out = io.BytesIO()
            img.convert("RGB").save(out, format="JPEG", quality=quality)
    except Exception as err:
        raise ValueError(f"cannot read image {where}: {err}") from err
    return out.getvalue()


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    it = iter(samples)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def convert_split(samples: Iterable[Sample], classes: list[str], out_dir: str | Path, name: str,
                  split: str, num_workers: int = 4, shard_bytes: float = 1e9, overwrite: bool = False,
                  progress: bool = True, total: int | None = None) -> dict:
    """Write ``samples`` ((index, image, labels) in order) as shards; returns the info dict.

    Any exception from the sample stream, an image or the writer removes everything this split
    wrote so far. Workers only read/encode images; the chunk after the one being written is
    already in flight, so the pool stays busy while the main process writes.
    """
    from tqdm import tqdm

    if total is None and hasattr(samples, "__len__"):
        total = len(samples)  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=f"{name}/{split}", unit="img", disable=not progress)
    pool = mp.get_context("fork").Pool(num_workers) if num_workers > 0 else None
    chunk = max(8, 16 * max(1, num_workers))
    try:
        with ShardWriter(out_dir, name, split, classes, shard_bytes=shard_bytes, overwrite=overwrite) as w:
            pending = None  # (chunk, async result) submitted but not yet written
            for batch in itertools.chain(_chunks(samples, chunk), [None]):
                submitted = None
                if batch is not None:
                    images = [image for _, image, _ in batch]
                    submitted = (batch, pool.map_async(jpeg_bytes, images) if pool else None)
                if pending is not None:
                    prev, result = pending
                    encoded = result.get() if result is not None else [jpeg_bytes(i) for _, i, _ in prev]
                    for (index, _, labels), data in zip(prev, encoded):
                        w.write(index, data, labels)
                    bar.update(len(prev))
                pending = submitted
            info = w.close()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return info


def convert_labeled(split_data: LabeledSplit, out_dir: str | Path, name: str, split: str, **kwargs) -> dict:
    """:func:`convert_split` for a whole :class:`LabeledSplit`."""
    return convert_split(split_data, split_data.classes, out_dir, name, split, total=len(split_data),
                         **kwargs)
