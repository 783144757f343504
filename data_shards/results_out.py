"""Where a benchmark writes its results: one rule for every ``sst-dist bench`` script (here, beside
safe_io, which it builds on, so kernels/bench.py uses it without importing sst_dist). Checked before
any work (a refusal: one line naming the path, exit 2): an explicit path that exists is refused unless
--overwrite; a default, dated name already taken gets a free -2, -3 suffix; a symbolic link is never
written through. Written at the end under a temporary name in the same folder, then linked to a name
still free (or, with --overwrite, renamed over it)."""

import itertools
import os
import sys
from pathlib import Path

from data_shards.safe_io import atomic_write_text

OVERWRITE_HELP = "replace an existing output file (default: an existing --out is refused; a dated " \
                 "default name already taken gets a free -2, -3 suffix)"


class OutputRefused(Exception):  # its message: one line naming the path and saying what to do
    def exit(self, prog: str | None) -> int:
        print(f"{prog or Path(sys.argv[0]).name}: {self}", file=sys.stderr)
        return 2


def _suffixed(paths: list[Path], k: int) -> list[Path]:
    return [p if k == 1 else p.with_name(f"{p.stem}-{k}{p.suffix}") for p in paths]


class Results:  # the files of one run (one per name, suffixed together), claimed before the work
    def __init__(self, base: list[Path], k: int, replace: bool):
        self.base, self.k, self.replace, self.paths = base, k, replace, _suffixed(base, k)
        self.path = self.paths[0]

    def write(self, *texts: str) -> Path:  # one text per path; a later call replaces this run's files
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for k in [self.k] if self.replace else itertools.count(self.k):  # a name taken meanwhile: next
            done: list[Path] = []
            try:
                for p, text in zip(_suffixed(self.base, k), texts, strict=True):
                    atomic_write_text(p, text, exclusive=not self.replace)  # exclusive: never replaces
                    done.append(p)
                break
            except FileExistsError:
                for p in done:
                    p.unlink()
        if k != self.k:
            print(f"note: {self.path} appeared during the run; wrote {done[0]} instead", file=sys.stderr)
        self.k, self.paths, self.path, self.replace = k, done, done[0], True  # ours now
        return self.path


def _claim(base: list[Path], explicit: bool, overwrite: bool, shown: str) -> Results:
    up = base[0].absolute().parent  # the nearest existing folder: a directory we may write into
    while not os.path.lexists(up):
        up = up.parent
    if not up.is_dir() or not os.access(up, os.W_OK | os.X_OK):
        raise OutputRefused(f"{shown}: cannot write into {up}; choose another path")
    if not (explicit or overwrite):  # a default, dated name: the first free suffix
        free = next(k for k in itertools.count(1) if not any(map(os.path.lexists, _suffixed(base, k))))
        return Results(base, free, replace=False)
    for p, where in ((p, shown if explicit else str(p)) for p in base):
        if p.is_symlink():
            raise OutputRefused(f"{where} is a symbolic link; refusing to write through it (remove it first)")
        if os.path.lexists(p) and not p.is_file():
            raise OutputRefused(f"{where} is not a regular file; give the results file's path")
        if p.exists() and not overwrite:
            raise OutputRefused(f"{where} exists; choose another path or pass --overwrite")
    return Results(base, 1, replace=overwrite)


def file_output(out: str | None, default: str | Path, *, overwrite: bool, flag: str = "--out") -> Results:
    if out is not None and (out.endswith(("/", os.sep)) or os.path.isdir(out)):  # --out FILE or default
        raise OutputRefused(f"{flag} {out} names a directory; give the results file's path")
    path = Path(out if out is not None else default)
    return _claim([path], out is not None, overwrite, f"{flag} {out}" if out is not None else str(path))


def dir_output(out_dir: str | Path, names: list[str], *, overwrite: bool, flag: str = "--out") -> Results:
    if os.path.lexists(out_dir) and not Path(out_dir).is_dir():  # dated names in a folder
        raise OutputRefused(f"{flag} {out_dir} exists and is not a directory; give a folder")
    return _claim([Path(out_dir) / n for n in names], False, overwrite, f"{flag} {out_dir}")
