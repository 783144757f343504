"""ShardWriter: samples in dataset order -> GNU tar shards, DALI indices, labels and ``_info.json``.

Nothing becomes visible under a final name until :meth:`ShardWriter.close` commits the whole
split: every shard, its DALI index, the label matrix and finally ``_info.json`` are first written
under ``*.tmp`` names. An exception (or :meth:`abort`) deletes the temporaries, and a hard kill
leaves only ``*.tmp`` files, so an interrupted conversion never looks finished. Tar members get
fixed metadata (mtime 0, uid 0, mode 0644), so the same samples give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from data_shards import format as fmt

FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"
_BLOCK = tarfile.BLOCKSIZE


class _HashingFile(io.RawIOBase):
    """Write-only file that hashes and counts what passes through (no second read of the shard)."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data)
        self._f.write(view)
        self.sha.update(view)
        self.nbytes += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.nbytes

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        super().close()


def _member_size(nbytes: int) -> int:
    """Bytes a regular member of ``nbytes`` takes in the tar: header + padded data."""
    return _BLOCK + -(-nbytes // _BLOCK) * _BLOCK


def write_dali_index(shard: Path, index_path: Path) -> None:
    """DALI ``fn.readers.webdataset`` index of ``shard`` by DALI's own ``wds2idx`` tool.

    Falls back to writing the same documented format (``v1.2 N`` then one line per sample of
    ``ext offset size name`` per member) from ``tarfile`` when the tool is not installed.
    """
    try:
        from wds2idx import IndexCreator  # shipped with nvidia-dali
    except ImportError:
        index_path.write_text(dali_index_text(shard))
        return
    with IndexCreator(str(shard), str(index_path), verbose=False) as creator:
        creator.create_index()


def dali_index_text(shard: Path) -> str:
    """The DALI webdataset index (format v1.2) of ``shard``, computed with ``tarfile``."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            dot = base.find(".")
            key, ext = member.name[: len(member.name) - len(base) + dot], base[dot + 1 :]
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if key != last:
                samples.append([entry])
                last = key
            else:
                samples[-1].append(entry)
    if not samples:
        raise ValueError(f"{shard}: empty shard, no DALI index possible")
    return f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Write one split of a dataset as shards; use as a context manager or call close()/abort().

    ``write(index, jpeg_bytes, labels)`` must receive global indices 0, 1, 2, ... in order; a new
    shard starts when the current one would pass ``shard_bytes``.
    """

    def __init__(self, out_dir: str | Path, name: str, split: str, class_names: list[str],
                 shard_bytes: float = 1e9, overwrite: bool = False):
        for arg, value in (("name", name), ("split", split)):
            if not value or "-" in value or "/" in value or "." in value:
                raise ValueError(f"{arg} must be non-empty without '-', '/' or '.', got {value!r}")
        if not class_names or len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be non-empty and unique, got {list(class_names)!r}")
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
        self.out_dir = Path(out_dir)
        self.name, self.split = name, split
        self.classes = [str(c) for c in class_names]
        self.shard_bytes = int(shard_bytes)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._clear_previous(overwrite)
        self._labels: list[np.ndarray] = []
        self._shards: list[dict] = []
        self._tmp_paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._file: _HashingFile | None = None
        self._samples_in_shard = 0
        self._closed = False

    # -- public API -------------------------------------------------------------------------
    def write(self, index: int, image: bytes, labels: np.ndarray) -> None:
        """Append one sample (JPEG bytes kept as given) with its full label vector."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if index != len(self._labels):
            raise ValueError(f"samples must arrive in order: expected index {len(self._labels)}, got {index}")
        vec = np.asarray(labels)
        if vec.shape != (len(self.classes),):
            raise ValueError(f"sample {index}: labels shape {vec.shape}, expected ({len(self.classes)},)")
        lbl = fmt.encode_labels(vec)
        members = [(fmt.IMAGE_EXT, bytes(image)), (fmt.LABEL_EXT, lbl),
                   (fmt.INDEX_EXT, fmt.encode_index(index))]
        size = sum(_member_size(len(data)) for _, data in members)
        if self._tar is None or (self._samples_in_shard and self._file.tell() + size > self.shard_bytes):
            self._finish_shard()
            self._start_shard()
        key = fmt.sample_key(index)
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._labels.append(np.frombuffer(lbl, dtype=np.int8))
        self._samples_in_shard += 1

    def close(self) -> dict:
        """Finish the last shard and commit everything; returns the ``_info.json`` content."""
        if self._closed:
            raise RuntimeError("ShardWriter is already closed")
        if not self._labels:
            self.abort()
            raise ValueError(f"{self.name}/{self.split}: no samples were written")
        try:
            self._finish_shard()
            labels = np.stack(self._labels).astype(np.int8)
            info = {
                "format_version": FORMAT_VERSION,
                "dataset": self.name,
                "split": self.split,
                "classes": self.classes,
                "num_classes": len(self.classes),
                "num_samples": int(labels.shape[0]),
                "shards": self._shards,
                "positives": (labels == 1).sum(axis=0).astype(int).tolist(),
                "labels": fmt.labels_path(self.out_dir, self.name, self.split).name,
            }
            buf = io.BytesIO()
            np.save(buf, labels)
            for shard in self._shards:  # shards and indices first, info last
                final = self.out_dir / shard["name"]
                os.replace(self._tmp(fmt.dali_index_path(final)), fmt.dali_index_path(final))
                os.replace(self._tmp(final), final)
            _atomic_write_bytes(fmt.labels_path(self.out_dir, self.name, self.split), buf.getvalue())
            text = json.dumps(info, indent=1) + "\n"
            _atomic_write_bytes(fmt.info_path(self.out_dir, self.name, self.split), text.encode())
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return info

    def abort(self) -> None:
        """Drop everything written so far (temporaries and any shard already renamed)."""
        self._closed = True
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            except Exception:
                pass
            self._tar = None
        for path in self._tmp_paths:
            path.unlink(missing_ok=True)
        for shard in self._shards:
            final = self.out_dir / shard["name"]
            final.unlink(missing_ok=True)
            fmt.dali_index_path(final).unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    # -- internals --------------------------------------------------------------------------
    def _tmp(self, path: Path) -> Path:
        return path.with_name(path.name + TMP_SUFFIX)

    def _clear_previous(self, overwrite: bool) -> None:
        info = fmt.info_path(self.out_dir, self.name, self.split)
        stem = f"{self.name}-{self.split}-"
        old = [p for p in self.out_dir.iterdir() if p.name.startswith(stem)
               and (p.name.endswith((".tar", ".tar.idx", TMP_SUFFIX)) or p == info
                    or p == fmt.labels_path(self.out_dir, self.name, self.split))]
        if old and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already holds {stem}* files ({sorted(p.name for p in old)[:3]}...); "
                "pass overwrite=True (--overwrite) to replace them"
            )
        info.unlink(missing_ok=True)  # first, so a half-replaced split never looks finished
        for path in old:
            path.unlink(missing_ok=True)

    def _start_shard(self) -> None:
        final = self.out_dir / fmt.shard_name(self.name, self.split, len(self._shards))
        tmp = self._tmp(final)
        self._tmp_paths += [tmp, self._tmp(fmt.dali_index_path(final))]
        self._file = _HashingFile(tmp)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self._samples_in_shard = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # writes the end-of-archive blocks through the hashing file
        self._file.close()
        final = self.out_dir / fmt.shard_name(self.name, self.split, len(self._shards))
        write_dali_index(self._tmp(final), self._tmp(fmt.dali_index_path(final)))
        self._shards.append({"name": final.name, "samples": self._samples_in_shard,
                             "bytes": self._file.nbytes, "sha256": self._file.sha.hexdigest()})
        self._tar = None


def verify_shards(shard_dir: str | Path, split: str | None = None) -> list[str]:
    """Problems found re-hashing every shard listed by the ``_info.json`` files (empty: all good)."""
    shard_dir = Path(shard_dir)
    pattern = f"*-{split}-_info.json" if split else "*-_info.json"
    infos = sorted(shard_dir.glob(pattern))
    if not infos:
        return [f"no {pattern} in {shard_dir}"]
    problems = []
    for info_file in infos:
        info = json.loads(info_file.read_text())
        for shard in info["shards"]:
            path = shard_dir / shard["name"]
            if not path.is_file():
                problems.append(f"{info_file.name}: missing shard {path}")
                continue
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    sha.update(block)
            if sha.hexdigest() != shard["sha256"] or path.stat().st_size != shard["bytes"]:
                problems.append(f"{path}: sha256/size differ from {info_file.name}")
            if not fmt.dali_index_path(path).is_file():
                problems.append(f"{path}: missing DALI index {fmt.dali_index_path(path).name}")
        labels = shard_dir / info.get("labels", "")
        if not labels.is_file():
            problems.append(f"{info_file.name}: missing label matrix {labels}")
    return problems
