"""The conversion driver shared by all converters: samples in dataset order -> one shard split.

A converter produces a :class:`LabeledSplit` (class names, images in dataset order, full label
matrix). :func:`convert_split` reads/encodes images in a pool of worker processes while the main
process writes them in order, so the shards keep the dataset order however the workers finish.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_shards.images import DEFAULT_MAX_PIXELS, open_image, open_rgb
from data_shards.writer import ShardWriter

ImageRef = str | Path | bytes
Sample = tuple[int, ImageRef, np.ndarray]
ORIENTATION_TAG = 0x0112


@dataclass
class LabeledSplit:
    """One split of a dataset: ``images[i]`` has full labels ``labels[i]`` (int8 in {+1,-1})."""

    classes: list[str]
    images: Sequence[ImageRef]
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(set(self.classes)) != len(self.classes):
            dup = next(c for c in self.classes if self.classes.count(c) > 1)
            raise ValueError(f"class name {dup!r} appears more than once")
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


def image_under(root: str | Path, relative: str, where: str, allow_outside: bool = False) -> Path:
    """``root / relative``, which must stay under ``root`` unless ``allow_outside``.

    Lexical check (``..`` and absolute paths), so an image folder made of symbolic links still
    works; ``where`` (file and line or record) goes into the error.
    """
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise ValueError(f"{where}: image path {relative!r} is not a non-empty string")
    base = Path(os.path.normpath(root))
    path = Path(os.path.normpath(base / relative))
    if not allow_outside and base != path and base not in path.parents:
        raise ValueError(f"{where}: image path {relative!r} leaves the image folder {root} "
                         "(pass --allow-outside-images if that is intended)")
    return path


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
    """Class names, one a line (blank lines skipped); a repeated name is an error naming both lines."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class-names file not found: {p}")
    names: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(read_text(p).splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if name in first_line:
            raise ValueError(f"{p}:{lineno}: class name {name!r} already on line {first_line[name]}")
        first_line[name] = lineno
        names.append(name)
    if not names:
        raise ValueError(f"class-names file {p} is empty")
    return names


def read_text(path: Path) -> str:
    """A text file as UTF-8; ValueError naming it otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text: {err}") from err


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_json(text: str, where: str):
    """``json.loads`` where a repeated object key (silently last-wins in json) is an error."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from err
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def class_indices(value, num_classes: int, where: str, by_name: dict[str, int] | None = None) -> list[int]:
    """One image's labels: a list of 0-based indices (or, with ``by_name``, class names)."""
    if not isinstance(value, list):
        raise ValueError(f"{where}: labels must be a list, got {type(value).__name__} {value!r:.60}")
    out = []
    for lab in value:
        if isinstance(lab, str) and by_name is not None:
            if lab not in by_name:
                raise ValueError(f"{where}: unknown class name {lab!r}")
            out.append(by_name[lab])
        elif isinstance(lab, int) and not isinstance(lab, bool):
            if not 0 <= lab < num_classes:
                raise ValueError(f"{where}: class index {lab} outside [0, {num_classes})")
            out.append(lab)
        else:
            kind = "a class name nor an index" if by_name is not None else "a class index"
            raise ValueError(f"{where}: label {lab!r} is neither {kind}" if by_name is not None
                             else f"{where}: label {lab!r} is not {kind}")
    return out


def jpeg_bytes(image: ImageRef, quality: int = 95, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The image as JPEG bytes that every loader backend decodes to :func:`open_rgb`'s picture.

    A JPEG is kept byte for byte when it is plain 8-bit RGB or gray with no EXIF rotation (so
    DALI, nvJPEG and PIL agree on its pixels); anything else (CMYK, rotated, PNG with alpha,
    16-bit, ...) is decoded by :func:`open_rgb` and re-encoded. Every image is fully decoded once
    here, so a damaged one is found at conversion time. ValueError/FileNotFoundError name it.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data, where = bytes(image), "<bytes>"
    else:
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        data, where = path.read_bytes(), str(path)
    im = open_image(data, max_pixels=max_pixels, where=where)
    keep = im.format == "JPEG" and im.mode in ("RGB", "L") and im.getexif().get(ORIENTATION_TAG, 1) == 1
    rgb = open_rgb(data, max_pixels=max_pixels, where=where)  # full decode: damaged images show here
    if keep:
        return data
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _encode_or_error(image: ImageRef, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes | str:
    """Worker task: the JPEG bytes, or the one-line reason the image is unusable."""
    try:
        return jpeg_bytes(image, max_pixels=max_pixels)
    except (OSError, ValueError) as err:
        return str(err) or type(err).__name__


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    it = iter(samples)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class BadImagesError(ValueError):
    """Images of a conversion that cannot be used; all of them are listed, not just the first."""

    def __init__(self, bad: list[dict], total: int):
        self.bad = bad
        lines = "; ".join(f"#{b['index']} {b['error']}" for b in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        super().__init__(f"{len(bad)} of {total} images cannot be used: {lines}{more}. "
                         "Fix them, or pass --bad-images skip to leave them out (counted in _info.json)")


def _missing_dirs(path: str | Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing, p = [], Path(path)
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _remove_created(dirs: list[Path]) -> None:
    """Remove the folders a failed conversion created, deepest first, while they are empty.

    The writer has already removed its own temporaries; ``rmdir`` refuses a folder holding
    anything else (something a user put there meanwhile), and then it and its parents stay.
    """
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def convert_split(samples: Iterable[Sample], classes: list[str], out_dir: str | Path, name: str,
                  split: str, num_workers: int = 4, shard_bytes: float = 1e9, overwrite: bool = False,
                  progress: bool = True, total: int | None = None, bad_images: str = "fail",
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Write ``samples`` ((index, image, labels) in order) as shards; returns the info dict.

    Every image is read; the unusable ones are collected. ``bad_images="fail"`` then raises
    :class:`BadImagesError` naming all of them and nothing is committed (an older split stays);
    ``"skip"`` leaves them out, renumbers the rest in order and records them in ``_info.json``
    (``skipped_images``: source index, image, reason). Workers only read/encode images; the next
    chunk is already in flight while the main process writes. If the conversion fails, the
    output folder (and parents) it created are removed again; a folder that existed is kept.
    """
    from tqdm import tqdm

    if bad_images not in ("fail", "skip"):
        raise ValueError(f"bad_images (--bad-images) must be 'fail' or 'skip', got {bad_images!r}")
    if total is None and hasattr(samples, "__len__"):
        total = len(samples)  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=f"{name}/{split}", unit="img", disable=not progress)
    pool = mp.get_context("fork").Pool(num_workers) if num_workers > 0 else None
    chunk = max(8, 16 * max(1, num_workers))
    bad: list[dict] = []
    seen = 0
    encode = functools.partial(_encode_or_error, max_pixels=max_pixels)
    created = _missing_dirs(out_dir)
    try:
        with ShardWriter(out_dir, name, split, classes, shard_bytes=shard_bytes, overwrite=overwrite) as w:
            pending = None  # (chunk, async result) submitted but not yet written
            written = 0
            for batch in itertools.chain(_chunks(samples, chunk), [None]):
                submitted = None
                if batch is not None:
                    images = [image for _, image, _ in batch]
                    submitted = (batch, pool.map_async(encode, images) if pool else None)
                if pending is not None:
                    prev, result = pending
                    encoded = result.get() if result is not None else [encode(i) for _, i, _ in prev]
                    for (index, image, labels), data in zip(prev, encoded):
                        seen += 1
                        if isinstance(data, str):
                            ref = "<bytes>" if isinstance(image, (bytes, bytearray)) else str(image)
                            bad.append({"index": int(index), "image": ref, "error": data})
                        elif not bad or bad_images == "skip":
                            w.write(written, data, labels)
                            written += 1
                    bar.update(len(prev))
                pending = submitted
            if bad and bad_images == "fail":
                raise BadImagesError(bad, seen)
            if bad:
                w.extra_info = {"num_skipped": len(bad), "skipped_images": bad}
            info = w.close()
    except BaseException:
        _remove_created(created)
        raise
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
