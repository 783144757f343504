"""Synthetic multi-label scenes in COCO format: a real, structured dataset for tests and demos.

Each of K object classes has its own look (shape x colour x texture; the three cycle with
periods 8, 10 and 3, so up to 120 classes are distinct). A few scene types each favour their own
set of classes, which gives the labels a strong co-occurrence structure (what SST exploits), and
each scene has its own background texture. An image holds 2-5 objects of varied scale; later
objects may cover at most half of an earlier one's box. Output: ``instances_{split}.json`` (COCO
instances with boxes) and JPEGs, so it travels the same COCO path as the real data.

``difficulty="hard"`` makes scenes that a pretrained trunk does not saturate, with the same
scene types and hence the same co-occurrence structure: smaller objects, unlabelled distractors
that share shape, colour or texture with the classes (so a class is only its exact conjunction),
background clutter, and per-image lighting, contrast, colour cast and blur.

Everything is a pure function of ``(seed, split, image index, difficulty)``: the same seed gives
the same bytes, whatever the number of worker processes. The generation parameters are recorded
in ``synthetic.json`` beside the shards, so data built with other settings is refused, not reused.
:mod:`data_shards.synthetic_build` generates and shards a whole dataset, all or nothing.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from data_shards.safe_io import atomic_write_text

SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon"]
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "magenta": (200, 50, 190), "cyan": (40, 200, 210), "orange": (245, 140, 30),
    "purple": (110, 50, 160), "white": (245, 245, 245), "black": (20, 20, 20),
}
TEXTURES = ["solid", "striped", "dotted"]
SPLITS = {"train": 0, "test": 1}
_COLOUR_NAMES = list(COLOURS)
MAX_CLASSES = 120  # lcm(8, 10, 3): beyond it (shape, colour, texture) would repeat
DIFFICULTIES = ("easy", "hard")
PARAMS_FILE = "synthetic.json"


def class_appearance(k: int) -> tuple[str, str, str]:
    """(shape, colour, texture) of class ``k``; distinct for k < 120."""
    return SHAPES[k % len(SHAPES)], _COLOUR_NAMES[k % len(COLOURS)], TEXTURES[k % len(TEXTURES)]


def class_names(num_classes: int) -> list[str]:
    return ["_".join(reversed(class_appearance(k))) for k in range(num_classes)]


def scene_classes(num_classes: int, num_scenes: int, seed: int) -> list[np.ndarray]:
    """Each scene's typical classes: a random partition plus one class borrowed from another scene."""
    rng = np.random.default_rng([seed, 7919])
    perm = rng.permutation(num_classes)
    parts = np.array_split(perm, num_scenes)
    out = []
    for s, part in enumerate(parts):
        other = parts[(s + 1) % num_scenes]
        extra = other[:1] if len(other) and num_scenes > 1 else other[:0]
        out.append(np.unique(np.concatenate([part, extra])))
    return out


def _polygon(shape: str, size: int, angle: float) -> list[tuple[float, float]]:
    c, r = size / 2, size / 2
    if shape == "triangle":
        n, radii = 3, [r]
    elif shape == "diamond":
        n, radii = 4, [r]
    elif shape == "hexagon":
        n, radii = 6, [r]
    else:  # star
        n, radii = 10, [r, r * 0.45]
    return [(c + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n),
             c + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n)) for i in range(n)]


def _mask(shape: str, size: int, angle: float) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    last = size - 1
    if shape == "circle":
        d.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        inset = size // 10
        d.rectangle((inset, inset, last - inset, last - inset), fill=255)
    elif shape == "ring":
        w = max(2, size // 4)
        d.ellipse((0, 0, last, last), fill=255)
        d.ellipse((w, w, last - w, last - w), fill=0)
    elif shape == "cross":
        a, b = size * 3 // 8, size - size * 3 // 8
        d.rectangle((a, 0, b, last), fill=255)
        d.rectangle((0, a, last, b), fill=255)
    else:
        d.polygon(_polygon(shape, size, angle), fill=255)
    return m


def _texture(texture: str, size: int, phase: int) -> np.ndarray:
    """Boolean (size, size) pattern: True where the main colour shows."""
    y, x = np.mgrid[0:size, 0:size]
    period = max(4, size // 5)
    if texture == "striped":
        return ((x + y + phase) // (period // 2)) % 2 == 0
    if texture == "dotted":
        cy, cx = (y + phase) % period - period / 2, (x + phase) % period - period / 2
        return cy * cy + cx * cx > (period * 0.3) ** 2
    return np.ones((size, size), dtype=bool)


def _background(scene: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Scene-typed background: gradient, horizontal bands, checkerboard or soft noise."""
    base = np.array([[90, 140, 200], [120, 170, 90], [170, 150, 120], [110, 110, 130]][scene % 4], float)
    base = base + rng.uniform(-20, 20, 3)
    y, x = np.mgrid[0:size, 0:size] / size
    kind = scene % 4
    if kind == 0:
        shade = 0.75 + 0.35 * y
    elif kind == 1:
        shade = 0.85 + 0.15 * np.sign(np.sin((y * 8 + rng.uniform()) * math.pi))
    elif kind == 2:
        shade = 0.85 + 0.12 * ((np.floor(x * 6) + np.floor(y * 6)) % 2)
    else:
        shade = 0.8 + 0.2 * rng.random((size, size))
    if scene >= 4:  # more scenes than patterns: tilt the pattern so they still differ
        shade = shade * (0.9 + 0.2 * x)
    img = base[None, None, :] * shade[..., None] + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _paste_object(img: Image.Image, rng: np.random.Generator, look: tuple[str, str, str], size: int,
                  x0: int, y0: int, shade: tuple[float, float]) -> None:
    """Draw one object of appearance ``look`` at (x0, y0)."""
    shape, colour, texture = look
    mask = _mask(shape, size, float(rng.uniform(0, 2 * math.pi)))
    main = np.array(COLOURS[colour], float) * rng.uniform(*shade)
    second = main * 0.45 + 140 * 0.55  # washed-out companion colour for stripes/dots
    pattern = _texture(texture, size, int(rng.integers(size)))
    fill = np.where(pattern[..., None], main, second).astype(np.uint8)
    img.paste(Image.fromarray(fill), (x0, y0), mask)


def _distractor_look(num_classes: int, rng: np.random.Generator) -> tuple[str, str, str]:
    """An appearance no class has, sharing one or two attributes with a random class."""
    taken = {class_appearance(k) for k in range(num_classes)}
    while True:
        look = list(class_appearance(int(rng.integers(num_classes))))
        for i in rng.choice(3, size=int(rng.integers(1, 3)), replace=False):
            look[i] = str(rng.choice((SHAPES, _COLOUR_NAMES, TEXTURES)[i]))
        if tuple(look) not in taken:
            return look[0], look[1], look[2]


def _clutter(img: Image.Image, rng: np.random.Generator, count: int) -> None:
    """Thin lines and small blobs in random colours over the background."""
    d = ImageDraw.Draw(img)
    n = img.size[0]
    for _ in range(count):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = (int(v) for v in rng.integers(0, n, 2))
        if rng.random() < 0.5:
            x1, y1 = (int(v) for v in rng.integers(0, n, 2))
            d.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 3)))
        else:
            r = int(rng.integers(1, max(2, n // 24)))
            d.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)


def _photometric(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Per-image lighting, contrast, colour cast, blur and sensor noise."""
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.6, 1.3)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.55, 1.15)))
    arr = np.asarray(img, float) * rng.uniform(0.85, 1.15, 3) + rng.normal(0, 8, (*img.size[::-1], 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.6:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.4))))
    return img


def render_image(seed: int, split: str, index: int, num_classes: int, image_size: int,
                 scenes: list[np.ndarray], difficulty: str = "easy",
                 ) -> tuple[bytes, list[tuple[int, list[float]]]]:
    """JPEG bytes and [(class, [x, y, w, h])] of one image, a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    hard = difficulty == "hard"
    scene = int(rng.integers(len(scenes)))
    img = Image.fromarray(_background(scene, image_size, rng))
    n_obj = int(rng.integers(2, 6))
    typical = scenes[scene]
    size_range, shade = ((0.11, 0.24), (0.65, 1.0)) if hard else ((0.18, 0.45), (0.85, 1.0))
    if hard:  # unlabelled look-alikes and clutter first: labelled objects stay on top
        _clutter(img, rng, int(rng.integers(4, 12)))
        for _ in range(int(rng.integers(1, 4))):
            size = max(8, int(image_size * rng.uniform(*size_range)))
            x0, y0 = (int(v) for v in rng.integers(0, image_size - size + 1, 2))
            _paste_object(img, rng, _distractor_look(num_classes, rng), size, x0, y0, shade)
    objects: list[tuple[int, list[float]]] = []
    boxes: list[tuple[int, int, int]] = []
    for _ in range(n_obj):
        k = int(rng.choice(typical)) if rng.random() < 0.85 else int(rng.integers(num_classes))
        size = max(8, int(image_size * rng.uniform(*size_range)))
        for _try in range(10):  # keep at least half of every earlier box visible
            x0, y0 = (int(v) for v in rng.integers(0, image_size - size + 1, 2))
            if all(_overlap(x0, y0, size, bx, by, bs) <= 0.5 for bx, by, bs in boxes):
                break
        _paste_object(img, rng, class_appearance(k), size, x0, y0, shade)
        boxes.append((x0, y0, size))
        objects.append((k, [float(x0), float(y0), float(size), float(size)]))
    if hard:
        img = _photometric(img, rng)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue(), objects


def _overlap(x0: int, y0: int, s: int, bx: int, by: int, bs: int) -> float:
    """Fraction of the earlier box (bx, by, bs) that the new box covers."""
    w = min(x0 + s, bx + bs) - max(x0, bx)
    h = min(y0 + s, by + bs) - max(y0, by)
    return max(0, w) * max(0, h) / (bs * bs)


def _render_job(args: tuple) -> tuple[bytes, list]:
    return render_image(*args)


def check_generation(n_train: int, n_test: int, num_classes: int, image_size: int, num_scenes: int,
                     difficulty: str, names: dict[str, str] | None = None) -> None:
    """ValueError for settings :func:`generate_scenes` refuses, naming the setting as ``names``
    spells it (the CLI passes its flags, e.g. ``{"n_train": "--n-train"}``)."""
    def n(key: str) -> str:
        return (names or {}).get(key, key)

    if difficulty not in DIFFICULTIES:
        raise ValueError(f"{n('difficulty')} must be one of {DIFFICULTIES}, got {difficulty!r}")
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"{n('num_classes')} must be in [2, {MAX_CLASSES}], got {num_classes}")
    if not 1 <= num_scenes <= num_classes:
        raise ValueError(f"{n('num_scenes')} must be in [1, {n('num_classes')}={num_classes}], "
                         f"got {num_scenes}")
    if image_size < 32:
        raise ValueError(f"{n('image_size')} must be >= 32, got {image_size}")
    if n_train < 1:
        raise ValueError(f"{n('n_train')} must be >= 1 (the training split cannot be empty), got {n_train}")
    if n_test < 0:
        raise ValueError(f"{n('n_test')} must be >= 0 (0: no test split), got {n_test}")


def generate_scenes(out_dir: str | Path, n_train: int, n_test: int, num_classes: int = 12,
                    image_size: int = 128, seed: int = 0, num_scenes: int = 4,
                    num_workers: int = 0, difficulty: str = "easy") -> dict[str, tuple[Path, Path]]:
    """Write both splits; returns {split: (instances JSON path, image directory)}.

    ``n_train`` must be at least 1; ``n_test`` may be 0 (the test annotation file then lists no
    images, and ``sst-dist shards synthetic`` writes no test split). ``out_dir`` must not hold
    scenes or COCO files yet (FileExistsError, before anything is written).
    """
    check_generation(n_train, n_test, num_classes, image_size, num_scenes, difficulty)
    out = Path(out_dir)
    for split in SPLITS:  # never write over scenes (or a user's COCO files) already there
        ann, images = out / f"instances_{split}.json", out / split
        if os.path.lexists(ann) or (images.is_dir() and any(images.iterdir())) or images.is_symlink():
            raise FileExistsError(f"{out} already holds {ann.name if os.path.lexists(ann) else split + '/'}; "
                                  "generate into a new or empty folder")
    scenes = scene_classes(num_classes, num_scenes, seed)
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"}
                  for k, name in enumerate(class_names(num_classes))]
    result = {}
    pool = mp.get_context("fork").Pool(num_workers) if num_workers > 0 else None
    try:
        for split, count in (("train", n_train), ("test", n_test)):
            image_dir = out / split
            image_dir.mkdir(parents=True, exist_ok=True)
            jobs = [(seed, split, i, num_classes, image_size, scenes, difficulty) for i in range(count)]
            rendered = pool.imap(_render_job, jobs, chunksize=32) if pool else map(_render_job, jobs)
            images, annotations = [], []
            for i, (data, objects) in enumerate(rendered):
                file_name = f"{split}_{i:07d}.jpg"
                (image_dir / file_name).write_bytes(data)
                images.append({"id": i + 1, "file_name": file_name,
                               "width": image_size, "height": image_size})
                for k, box in objects:
                    annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": k + 1,
                                        "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
            ann_path = out / f"instances_{split}.json"
            about = f"synthetic scenes seed={seed} scenes={num_scenes} difficulty={difficulty}"
            doc = {"info": {"description": about},
                   "images": images, "annotations": annotations, "categories": categories}
            tmp = ann_path.with_name(ann_path.name + ".tmp")
            tmp.write_text(json.dumps(doc))
            tmp.replace(ann_path)
            result[split] = (ann_path, image_dir)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return result


def generation_params(n_train: int, n_test: int, num_classes: int, image_size: int, seed: int,
                      num_scenes: int, difficulty: str) -> dict[str, object]:
    """What decides a synthetic dataset's bytes: recorded beside its shards, compared on reuse."""
    return {"n_train": n_train, "n_test": n_test, "num_classes": num_classes, "image_size": image_size,
            "seed": seed, "num_scenes": num_scenes, "difficulty": difficulty}


def record_params(shard_dir: str | Path, params: dict[str, object], name: str | None = None) -> None:
    """Write ``synthetic.json`` (atomically, never through a planted link) beside the shards.

    ``name`` (the dataset name in the shard file names) is recorded too, so a second dataset is
    not given the first one's record; :func:`check_params` compares only ``params``, and records
    from before the name (none) still read.
    """
    doc = {**params, "name": name} if name is not None else dict(params)
    atomic_write_text(Path(shard_dir) / PARAMS_FILE, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def check_params(shard_dir: str | Path, params: dict[str, object]) -> None:
    """Refuse shards generated with other settings, in one line naming the file, key and values.

    Shards from before the record existed (no ``synthetic.json``) were made by the easy generator;
    they are accepted only for ``difficulty=easy``.
    """
    path = Path(shard_dir) / PARAMS_FILE
    if not path.is_file():
        if params.get("difficulty", "easy") != "easy":
            raise ValueError(f"{path} is missing: the shards in {shard_dir} predate the difficulty option "
                             f"(easy scenes), but difficulty={params['difficulty']} was asked for; "
                             "use another data.root")
        return
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable synthetic-data record ({e})") from None
    for key, want in params.items():
        if have.get(key, "easy" if key == "difficulty" else None) != want:
            raise ValueError(f"{path}: the shards were generated with {key}={have.get(key)!r}, not {want!r}; "
                             "use another data.root (or regenerate)")
