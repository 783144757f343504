"""Generate synthetic scenes and shard them, all or nothing (``sst-dist shards synthetic``, and
training's on-demand data).

One synthetic dataset per shard folder: its splits, its generation record ``synthetic.json``
(which names the dataset) and its raw COCO folder (default ``OUT/raw-synthetic``, marked as this
module's by ``synthetic-raw.json``) belong together, and are replaced together or not at all.

Everything that could make the command refuse is checked before the first write: a split of the
dataset already there (without ``overwrite``), a record of another dataset, a raw folder holding
files this module did not make (or the raw source of another shard folder). The scenes are then
rendered into a temporary folder beside the raw one, and the splits converted (each swapped in
whole by the shard writer). The old splits and record are kept as hard links until the end, so a
failure or Ctrl-C at any step puts back every file as it was and removes the folders this call
created; the raw folder is swapped in by renames, and the record is written last.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from data_shards import format as fmt
from data_shards.images import DEFAULT_MAX_PIXELS
from data_shards.safe_io import UnsafePathError, atomic_write_text
from data_shards.synthetic import PARAMS_FILE, generate_scenes, record_params

RAW_DIR = "raw-synthetic"  # default raw folder, under the shard folder
RAW_MARK = "synthetic-raw.json"  # in a raw folder this module made: which shard folder it feeds
_RAW_JPEG = re.compile(r"(train|test)_\d{7}\.jpg")


@dataclass
class SyntheticBuild:
    """What :func:`build_synthetic` did: the new splits' ``_info.json`` content, the splits it
    removed (a test split when ``n_test`` is 0), and the raw folder."""

    infos: dict[str, dict] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    raw: Path | None = None


def split_files(out: Path, name: str, split: str) -> list[Path]:
    """The files of split ``name``/``split`` in ``out`` (committed or left over): ``_info.json``,
    shards, their indices and label matrices, as the shard writer names them."""
    if not out.is_dir():
        return []
    return sorted(_split_members({p.name: p for p in out.iterdir()}, name, split))


def _new_dir(parent: Path, stem: str) -> Path:
    """A fresh hidden folder in ``parent`` (mode as umask gives, unlike mkdtemp's 0700)."""
    while True:
        path = parent / f".{stem}.{secrets.token_hex(6)}.tmp"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing, p = [], path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _legacy_raw(raw: Path) -> bool:
    """A raw folder written before the mark existed: only what :func:`generate_scenes` writes."""
    for p in raw.iterdir():
        if p.name in ("train", "test") and p.is_dir() and not p.is_symlink():
            if not all(_RAW_JPEG.fullmatch(q.name) and q.name.startswith(p.name) for q in p.iterdir()):
                return False
        elif p.name in ("instances_train.json", "instances_test.json") and p.is_file() and not p.is_symlink():
            info = (_read_json(p) or {}).get("info")
            about = info.get("description") if isinstance(info, dict) else None
            if not (isinstance(about, str) and about.startswith("synthetic scenes")):
                return False
        else:
            return False
    return True


def _check_dir(path: Path, what: str) -> None:
    """Refuse (before any write) a folder the shard writer would refuse later."""
    if path.is_symlink():
        raise UnsafePathError(f"{what} {path} is a symbolic link; refusing to write through it "
                              "(choose a real directory)")
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{what} {path} exists and is not a directory")
        owner = os.lstat(path).st_uid
        if hasattr(os, "getuid") and owner != os.getuid():
            raise UnsafePathError(f"{what} {path} belongs to uid {owner}, not to you; "
                                  "choose another directory")


def _preflight(out: Path, raw: Path, name: str, splits: tuple[str, str], overwrite: bool,
               default_raw: bool, shard_bytes: float) -> dict[str, list[Path]]:
    """Every refusal, before anything is written; returns the existing files of each split."""
    if not isinstance(name, str) or not fmt.WORD.fullmatch(name):
        raise ValueError(f"dataset name (--name) must be a plain name of letters, digits and _, got {name!r}")
    for split in splits:
        if not fmt.WORD.fullmatch(split):
            raise ValueError(f"split name must be a plain name of letters, digits and _, got {split!r}")
    if splits[0] == splits[1]:
        raise ValueError(f"the train and test splits need two names, got {splits[0]!r} for both")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes (--shard-bytes) must be positive, got {shard_bytes}")
    _check_dir(out, "--out")
    raw_flag = "the raw folder" if default_raw else "--raw-dir"
    out_r, raw_r = out.resolve(), raw.resolve()
    if raw_r == out_r or raw_r in out_r.parents:
        raise ValueError(f"--raw-dir {raw} must not be --out {out} or a folder above it; "
                         "choose another folder")

    old = {split: split_files(out, name, split) for split in splits}
    for split, files in old.items():
        if files and not overwrite:
            shown = next((f for f in files if f.name.endswith("_info.json")), files[0]).name
            raise FileExistsError(f"{out} already holds split {split!r} of dataset {name!r} "
                                  f"({shown}); nothing was written: pass --overwrite to replace "
                                  "the dataset, or use another --out")

    record = out / PARAMS_FILE
    if os.path.lexists(record):
        doc = _read_json(record) if record.is_file() and not record.is_symlink() else None
        if doc is None:
            raise ValueError(f"{record}: unreadable synthetic-data record; nothing was written: "
                             "use another --out (or remove the file yourself)")
        recorded = doc.get("name")
        if recorded is not None and recorded != name:
            raise FileExistsError(f"{out} already holds synthetic dataset {recorded!r} ({record.name} "
                                  f"records its generation); a dataset named {name!r} would replace that "
                                  "record: nothing was written, use another --out")
        if recorded is None and not any(old.values()):
            raise FileExistsError(f"{record} records a synthetic dataset of which {out} holds no split "
                                  f"named {name!r}; nothing was written: use another --out")
        if not overwrite:
            raise FileExistsError(f"{out} already holds a synthetic dataset ({record.name}); nothing was "
                                  "written: pass --overwrite to replace it, or use another --out")

    _check_dir(raw, raw_flag)
    if raw.exists() and any(raw.iterdir()):
        mark = raw / RAW_MARK
        doc = _read_json(mark) if mark.is_file() and not mark.is_symlink() else None
        if doc is None and not (default_raw and _legacy_raw(raw)):
            raise FileExistsError(f"{raw_flag} {raw} holds files that `sst-dist shards synthetic` did not "
                                  f"make (no {RAW_MARK}); nothing was written: choose a new or empty folder")
        feeds = str(doc.get("out")) if doc else str(out_r)
        # the raw source of another shard folder (the default one moves with its folder)
        if feeds != str(out_r) and (not default_raw or Path(feeds).exists()):
            raise FileExistsError(f"{raw_flag} {raw} is the raw source of the shards in {feeds}; nothing was "
                                  "written: choose another --raw-dir")
        if not overwrite:
            raise FileExistsError(f"{raw_flag} {raw} already holds generated scenes; nothing was written: "
                                  "pass --overwrite to replace the dataset, or use another --out")
    return old


def _keep(files: list[Path], backup: Path) -> None:
    for f in files:
        try:
            os.link(f, backup / f.name, follow_symlinks=False)
        except OSError:  # no hard links here: a copy serves as well
            shutil.copy2(f, backup / f.name, follow_symlinks=False)


def build_synthetic(out: str | Path, params: dict[str, object], *, name: str = "synthetic",
                    raw_dir: str | Path | None = None, overwrite: bool = False,
                    splits: tuple[str, str] = ("train", "test"), num_workers: int = 0,
                    progress: bool = False, shard_bytes: float = 1e9, bad_images: str = "fail",
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> SyntheticBuild:
    """Generate the scenes of ``params`` (:func:`generation_params`) and shard them into ``out``.

    ``splits`` names the shard splits of the generator's train and test scenes. Without
    ``overwrite`` nothing of this dataset may be there yet; with it the dataset's splits, record
    and raw folder are replaced (and a test split removed when ``n_test`` is 0). Refusals raise
    ValueError / FileExistsError / NotADirectoryError / UnsafePathError (one line naming the path
    and what to do) before anything is written; any failure later restores what was there.
    """
    from data_shards.coco import read_coco
    from data_shards.convert import convert_labeled

    out = Path(out)
    raw = Path(raw_dir) if raw_dir is not None else out / RAW_DIR
    counts = (int(params["n_train"]), int(params["n_test"]))
    old = _preflight(out, raw, name, splits, overwrite, raw_dir is None, shard_bytes)

    created = sorted({*_missing_dirs(out), *_missing_dirs(raw.parent)}, key=lambda p: -len(p.parts))
    result = SyntheticBuild(raw=raw)
    tmp_raw = trash = backup = None
    touched: list[str] = []
    swapped = False
    record = out / PARAMS_FILE
    try:
        raw.parent.mkdir(parents=True, exist_ok=True)
        tmp_raw = _new_dir(raw.parent, raw.name)
        paths = generate_scenes(tmp_raw, counts[0], counts[1], num_classes=int(params["num_classes"]),
                                image_size=int(params["image_size"]), seed=int(params["seed"]),
                                num_scenes=int(params["num_scenes"]), num_workers=num_workers,
                                difficulty=str(params["difficulty"]))
        out.mkdir(parents=True, exist_ok=True)
        backup = _new_dir(out, "synthetic-backup")
        _keep([f for files in old.values() for f in files], backup)
        if os.path.lexists(record):
            _keep([record], backup)
        for (scenes, count), split in zip(zip(("train", "test"), counts), splits):
            touched.append(split)
            if count == 0:
                for f in old[split]:  # kept in the backup until the end
                    f.unlink()
                if old[split]:
                    result.removed.append(split)
                continue
            ann, image_dir = paths[scenes]
            result.infos[split] = convert_labeled(
                read_coco(ann, image_dir), out, name, split, num_workers=num_workers, shard_bytes=shard_bytes,
                overwrite=overwrite, progress=progress, bad_images=bad_images, max_pixels=max_pixels)
        mark = {"made_by": "sst-dist shards synthetic", "name": name, "out": str(out.resolve()), **params}
        atomic_write_text(tmp_raw / RAW_MARK, json.dumps(mark, indent=1, sort_keys=True) + "\n")
        if os.path.lexists(raw):
            trash = _new_dir(raw.parent, raw.name + ".old")
            os.rename(raw, trash)  # onto the empty temporary folder
        os.rename(tmp_raw, raw)
        swapped = True
        record_params(out, params, name=name)  # last: the record describes complete data
    except BaseException:
        _rollback(out, raw, name, touched, backup, tmp_raw, trash, swapped, created)
        raise
    for d in (trash, backup):
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
    return result


def _rollback(out: Path, raw: Path, name: str, touched: list[str], backup: Path | None,
              tmp_raw: Path | None, trash: Path | None, swapped: bool, created: list[Path]) -> None:
    """Put back every file as it was before :func:`build_synthetic`; best effort, never raising."""
    def attempt(fn, *a) -> None:
        try:
            fn(*a)
        except OSError:
            pass

    if swapped and tmp_raw is not None:
        attempt(os.rename, raw, tmp_raw)
    if trash is not None and not os.path.lexists(raw):
        attempt(os.rename, trash, raw)
    kept = {p.name: p for p in backup.iterdir()} if backup is not None and backup.is_dir() else {}
    for split in touched:
        info = fmt.info_path(out, name, split).name
        for p in sorted(_split_members(kept, name, split), key=lambda p: p.name == info):
            attempt(os.replace, p, out / p.name)  # _info.json, the commit point, last
        for p in split_files(out, name, split):  # what this call committed
            if p.name not in kept:
                attempt(p.unlink)
    if PARAMS_FILE in kept:
        attempt(os.replace, kept[PARAMS_FILE], out / PARAMS_FILE)
    for d in (tmp_raw, trash, backup):
        if d is not None and d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
    for d in created:  # deepest first; a folder someone filled meanwhile stays
        attempt(d.rmdir)


def _split_members(files: dict[str, Path], name: str, split: str) -> list[Path]:
    """Those of ``files`` (by name) that belong to split ``name``/``split``."""
    info = fmt.info_path(".", name, split).name
    return [p for n, p in files.items()
            if n == info or fmt.shard_number(n[:-4] if n.endswith(".tar.idx") else n, name, split) is not None
            or fmt.is_labels_name(n, name, split)]
