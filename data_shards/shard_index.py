"""Shard metadata checked before any reader (ours, webdataset's, DALI's native one) sees it.

A DALI index (``X.tar.idx``, format v1.x: ``v1.2 N`` then per sample ``ext offset size name``
for each member) drives raw ``seek``/``read`` in our readers and native code in DALI's
webdataset reader, which crashes the process on an entry past the end of the tar. So an index is
accepted only if every entry lies inside the file, after room for its 512-byte tar header, in
strictly increasing non-overlapping order, with the exact member names and sizes of this format,
and the sample keys are the consecutive global indices the shard holds. That is one pass over a
small text file per shard at open time. Whether the entries match the tar's own headers is
checked per member as it is read (:func:`check_header`: the 512 bytes before the data come in
the same read), and for the whole index at once by :func:`check_all_headers` (DALI's own
reader, ``shards verify``).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from data_shards import format as fmt

BLOCK = tarfile.BLOCKSIZE
EXTS = (fmt.IMAGE_EXT, fmt.LABEL_EXT, fmt.INDEX_EXT)


@dataclass(frozen=True)
class Member:
    """One tar member of a sample: data offset and size in the shard."""

    offset: int
    size: int


Sample = tuple[int, dict[str, Member]]  # (global index, {ext: member})


def member_name(index: int, ext: str) -> str:
    return f"{fmt.sample_key(index)}.{ext}"


def parse_index(index_path: Path, shard_path: Path, first: int, count: int, num_classes: int) -> list[Sample]:
    """The validated samples of a shard's DALI index (module docstring); ValueError naming the line."""
    try:
        lines = index_path.read_text(encoding="ascii").splitlines()
    except (UnicodeDecodeError, OSError) as err:
        raise ValueError(f"{index_path}: unreadable DALI index: {err}") from err
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1") or head[1] != str(count) or len(lines) != count + 1:
        raise ValueError(f"{index_path}: expected a DALI index 'v1.x {count}' with {count} sample lines, "
                         f"got first line {lines[0] if lines else ''!r} and {max(0, len(lines) - 1)} lines")
    samples = []
    for k, line in enumerate(lines[1:]):
        parts = line.split()
        where = f"{index_path}:{k + 2}"
        key = fmt.sample_key(first + k)
        exts = parts[0::4]
        if len(parts) % 4 or sorted(exts) != sorted(EXTS):
            raise ValueError(f"{where}: shard {shard_path.name}, key {key} has members {exts} "
                             f"({len(parts)} fields); expected .{', .'.join(EXTS)} (4 fields each)")
        members: dict[str, Member] = {}
        for j in range(0, len(parts), 4):
            ext, off, size, name = parts[j: j + 4]
            if ext not in EXTS or ext in members or name != member_name(first + k, ext):
                raise ValueError(f"{where}: member {ext} {name!r} is not {member_name(first + k, ext)!r} "
                                 "(wrong, duplicated or swapped entry)")
            if not (off.isdigit() and size.isdigit()):
                raise ValueError(f"{where}: offset {off!r} and size {size!r} must be non-negative integers")
            members[ext] = Member(int(off), int(size))
        samples.append((first + k, members))
    check_bounds(samples, shard_path, num_classes, str(index_path))
    return samples


def check_bounds(samples: list[Sample], shard_path: Path, num_classes: int, where: str) -> None:
    """Every member inside the file, header room before it, increasing and non-overlapping, exact sizes."""
    file_size = shard_path.stat().st_size
    end = 0  # first byte after the previous member's padded data
    for index, members in samples:
        for ext in sorted(EXTS, key=lambda e: members[e].offset):
            m = members[ext]
            bad = None
            if m.offset % BLOCK or m.offset < end + BLOCK:
                bad = "overlaps the previous member or its own header, or is not block-aligned"
            elif m.offset + m.size > file_size:
                bad = f"runs past the end of the file ({file_size} bytes)"
            elif ext == fmt.LABEL_EXT and m.size != num_classes:
                bad = f"label member must be {num_classes} bytes"
            elif ext == fmt.INDEX_EXT and m.size != 8:
                bad = "index member must be 8 bytes"
            if bad:
                raise ValueError(f"{where}: sample {index} member .{ext} at offset {m.offset} "
                                 f"size {m.size}: {bad}")
            end = m.offset + -(-m.size // BLOCK) * BLOCK


def parse_tar(shard_path: Path, first: int, count: int, num_classes: int) -> list[Sample]:
    """The same samples by scanning the tar itself (shards without an index, and verify)."""
    found: dict[int, dict[str, Member]] = {}
    try:
        with tarfile.open(shard_path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    raise ValueError(f"{shard_path}: member {m.name!r} is not a regular file")
                stem, _, ext = m.name.partition(".")
                if not stem.isdigit() or len(stem) != fmt.KEY_DIGITS or ext not in EXTS:
                    raise ValueError(f"{shard_path}: unexpected member {m.name!r}")
                entry = found.setdefault(int(stem), {})
                if ext in entry:
                    raise ValueError(f"{shard_path}: duplicate member {m.name!r}")
                entry[ext] = Member(m.offset_data, m.size)
    except tarfile.TarError as err:
        raise ValueError(f"{shard_path}: not a readable tar: {err}") from err
    if sorted(found) != list(range(first, first + count)) or any(len(v) != len(EXTS) for v in found.values()):
        raise ValueError(f"{shard_path}: holds samples {sorted(found)[:3]}... with members of "
                         f"{len(found)} keys; expected the {count} samples {first}..{first + count - 1} "
                         "with .jpg, .lbl and .idx each")
    samples = [(i, found[i]) for i in range(first, first + count)]
    check_bounds(samples, shard_path, num_classes, str(shard_path))
    return samples


def check_header(header: bytes, name: str, size: int, where: str) -> None:
    """The 512-byte tar header before a member's data must name ``name`` with ``size`` bytes."""
    if len(header) != BLOCK:
        raise ValueError(f"{where}: short read of the tar header of {name}")
    got_name = header[:100].split(b"\0", 1)[0].decode("ascii", "replace")
    try:
        got_size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        got_size = -1
    if got_name != name or got_size != size:
        raise ValueError(f"{where}: the index says {name} ({size} bytes) but the tar header there is "
                         f"{got_name!r} ({got_size} bytes): index and shard disagree")


def check_all_headers(shard_path: Path, samples: list[Sample]) -> None:
    """:func:`check_header` for every member of ``samples`` (one 512-byte read each)."""
    with open(shard_path, "rb") as f:
        for index, members in samples:
            for ext, m in members.items():
                f.seek(m.offset - BLOCK)
                check_header(f.read(BLOCK), member_name(index, ext), m.size, str(shard_path))
