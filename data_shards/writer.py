"""ShardWriter: samples in dataset order -> GNU tar shards, DALI indices, labels and ``_info.json``.

A split is built beside the old one and swapped in only when complete. Every file is first
written under a fresh, unpredictable hidden temporary name (``O_EXCL``: a planted file or link is
never opened) and renamed, at :meth:`ShardWriter.close`, to a name that no committed split uses:
with ``overwrite`` the new shards are numbered after the old ones. ``_info.json`` is replaced
last, atomically: it is the commit point, and only then are the old split's files removed. So a
failed, aborted or killed conversion leaves the old split exactly as it was (and at most hidden
``*.tmp`` files, which the next conversion of the split removes). One writer per split at a time
(``.NAME-SPLIT.lock``): a concurrent second conversion of it is refused. Tar members get fixed metadata
(mtime 0, uid 0, mode 0644), so the same samples give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from data_shards import format as fmt
from data_shards.file_lock import ExclusiveLock, describe
from data_shards.safe_io import atomic_write_text, ensure_own_dir

FORMAT_VERSION = 2  # 2: index_sha256 per shard and labels_sha256 (every file a loader reads is hashed)
TMP_SUFFIX = ".tmp"
LOCK_SUFFIX = ".lock"  # .NAME-SPLIT.lock: held while a split is written, never part of it
_BLOCK = tarfile.BLOCKSIZE


class _HashingFile(io.RawIOBase):
    """Write-only file that hashes and counts what passes through (no second read of the shard)."""

    def __init__(self, fd: int):
        self._f = os.fdopen(fd, "wb")
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


def split_lock(out_dir: Path, name: str, split: str) -> ExclusiveLock:
    """One writer per split: a second conversion of it (another process) is refused, naming the
    first, instead of removing the first one's temporaries and failing on a missing file."""

    def busy(holder: dict) -> FileExistsError:
        return FileExistsError(f"split {split!r} of dataset {name!r} in {out_dir} is being written by "
                               f"another conversion ({describe(holder)}); wait for it to finish")

    return ExclusiveLock(out_dir / f".{name}-{split}{LOCK_SUFFIX}", busy, remove=True)


class ShardWriter:
    """Write one split of a dataset as shards; use as a context manager or call close()/abort().

    ``write(index, jpeg_bytes, labels)`` must receive global indices 0, 1, 2, ... in order; a new
    shard starts when the current one would pass ``shard_bytes``. ``extra_info`` (a dict) is
    merged into ``_info.json`` at close (the converters record skipped images there).
    """

    def __init__(self, out_dir: str | Path, name: str, split: str, class_names: list[str],
                 shard_bytes: float = 1e9, overwrite: bool = False):
        for what, value in (("dataset name (--name)", name), ("split name", split)):
            if not isinstance(value, str) or not fmt.WORD.fullmatch(value):
                raise ValueError(f"{what} must be a plain name of letters, digits and _, got {value!r}")
        if not class_names or len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be non-empty and unique, got {list(class_names)!r}")
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes (--shard-bytes) must be positive, got {shard_bytes}")
        self.out_dir = ensure_own_dir(out_dir)
        self.name, self.split = name, split
        self.classes = [str(c) for c in class_names]
        self.shard_bytes = int(shard_bytes)
        self.extra_info: dict = {}
        self._lock = split_lock(self.out_dir, name, split)
        self._lock.acquire()  # before _previous, which removes this split's temporaries
        try:
            self._old_files, first = self._previous(overwrite)
        except BaseException:
            self._lock.release()
            raise
        self._first = first
        self._labels: list[np.ndarray] = []
        self._shards: list[dict] = []
        self._tmp: dict[str, Path] = {}  # final name -> its temporary
        self._renamed: list[Path] = []
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
        """Finish the last shard and swap the new split in; returns the ``_info.json`` content."""
        if self._closed:
            raise RuntimeError("ShardWriter is already closed")
        if not self._labels:
            self.abort()
            raise ValueError(f"{self.name}/{self.split}: no samples were written")
        try:
            self._finish_shard()
            labels = np.stack(self._labels).astype(np.int8)
            buf = io.BytesIO()
            np.save(buf, labels)
            labels_name = fmt.labels_name(self.name, self.split, self._first)
            self._write_tmp(labels_name, buf.getvalue())
            info = {
                "format_version": FORMAT_VERSION,
                "dataset": self.name,
                "split": self.split,
                "classes": self.classes,
                "num_classes": len(self.classes),
                "num_samples": int(labels.shape[0]),
                "shards": self._shards,
                "positives": (labels == 1).sum(axis=0).astype(int).tolist(),
                "labels": labels_name,
                "labels_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                **self.extra_info,
            }
            for final, tmp in self._tmp.items():  # names no committed split uses
                os.replace(tmp, self.out_dir / final)
                self._renamed.append(self.out_dir / final)
            self._tmp = {}
            atomic_write_text(fmt.info_path(self.out_dir, self.name, self.split),
                              json.dumps(info, indent=1) + "\n")  # the commit point
        except BaseException:
            self.abort()
            raise
        self._closed = True
        keep = {p.name for p in self._renamed}
        for path in self._old_files:  # the old split, no longer referenced
            if path.name not in keep:
                path.unlink(missing_ok=True)
        self._lock.release()
        return info

    def abort(self) -> None:
        """Drop everything this writer wrote; the previous split (if any) stays as it was."""
        self._closed = True
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            except Exception:
                pass
            self._tar = None
        for path in [*self._tmp.values(), *self._renamed]:
            path.unlink(missing_ok=True)
        self._tmp, self._renamed = {}, []
        self._lock.release()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    # -- internals --------------------------------------------------------------------------
    def _previous(self, overwrite: bool) -> tuple[list[Path], int]:
        """Files of the committed split (and leftovers) of this name/split, and the first free number."""
        info_file = fmt.info_path(self.out_dir, self.name, self.split)
        referenced: set[str] = set()
        last = -1
        if info_file.exists() or info_file.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{self.out_dir} already holds split {self.split!r} of dataset "
                                      f"{self.name!r} ({info_file.name}); pass --overwrite to replace it "
                                      "(overwrite=True in Python)")
            try:
                old = fmt.load_info(info_file)
            except ValueError:
                old = None  # a damaged info: its files are found as leftovers below
            if old is not None and (old["dataset"], old["split"]) == (self.name, self.split):
                for shard in old["shards"]:
                    referenced |= {shard["name"], shard["name"] + ".idx"}
                    last = max(last, fmt.shard_number(shard["name"], self.name, self.split))
                referenced.add(old.get("labels", fmt.labels_name(self.name, self.split)))
        stem = f"{self.name}-{self.split}-"
        old_files, leftovers = [], []
        for p in self.out_dir.iterdir():
            n = p.name
            if n.startswith(f".{stem}") and n.endswith(TMP_SUFFIX):
                p.unlink(missing_ok=True)  # a killed conversion's temporaries: never part of a split
                continue
            if not n.startswith(stem):
                continue
            base = n[:-4] if n.endswith(".tar.idx") else n
            number = fmt.shard_number(base, self.name, self.split)
            if number is None and not fmt.is_labels_name(n, self.name, self.split):
                continue
            old_files.append(p)
            if n not in referenced:
                leftovers.append(n)
            if number is not None:
                last = max(last, number)
        if leftovers and not overwrite:
            raise FileExistsError(f"{self.out_dir} holds {stem}* files of no committed split "
                                  f"({sorted(leftovers)[:3]}...); pass --overwrite to replace them "
                                  "(overwrite=True in Python)")
        return old_files, last + 1

    def _write_tmp(self, final: str, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(prefix=f".{final}.", suffix=TMP_SUFFIX, dir=self.out_dir)
        self._tmp[final] = Path(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        return hashlib.sha256(data).hexdigest()

    def _start_shard(self) -> None:
        final = fmt.shard_name(self.name, self.split, self._first + len(self._shards))
        fd, tmp = tempfile.mkstemp(prefix=f".{final}.", suffix=TMP_SUFFIX, dir=self.out_dir)
        os.fchmod(fd, 0o644)
        self._tmp[final] = Path(tmp)
        self._file = _HashingFile(fd)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self._samples_in_shard = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # writes the end-of-archive blocks through the hashing file
        self._file.close()
        final = fmt.shard_name(self.name, self.split, self._first + len(self._shards))
        index_sha = self._write_tmp(final + ".idx", dali_index_text(self._tmp[final]).encode())
        self._shards.append({"name": final, "samples": self._samples_in_shard, "bytes": self._file.nbytes,
                             "sha256": self._file.sha.hexdigest(), "index_sha256": index_sha})
        self._tar = None
