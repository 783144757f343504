"""Rank-filtered logging, a progress bar, TensorBoard and a metrics.jsonl record of every step.

Logs go to stderr (and the run's train.log); stdout is kept for results (JSON lines, tables), so
``sst-dist eval ... > result.json`` works. A batch job has no terminal for the progress bar, so
:class:`StepLine` writes a text line every ``train.log_every`` steps: step of total, loss, lr,
images/s, the share of time spent waiting for data, and the ETA of the run.

Only one rank logs (rank 0, or the rank named by ``SST_LOG_RANK``; ``SST_LOG_RANK=all`` lets
every rank log with a ``[rank N]`` prefix), so N ranks do not print N copies. The JSONL file
is the machine-readable record (one object per logged step/epoch/eval); TensorBoard gets the
same scalars when it is installed. A resumed run first drops what the interrupted run logged
after its checkpoint (``keep_upto``), so each step is recorded once. Appends never follow a link.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from data_shards.safe_io import UnsafePathError, atomic_write_text, ensure_own_dir, open_append
from sst_dist.train import distributed as D


def log_rank_enabled(rank: int | None = None) -> bool:
    """Whether this rank should log, per ``SST_LOG_RANK`` (default 0, or ``all``)."""
    rank = D.rank() if rank is None else rank
    sel = os.environ.get("SST_LOG_RANK", "0").strip().lower()
    if sel == "all":
        return True
    try:
        return rank == int(sel)
    except ValueError:
        raise ValueError(f"SST_LOG_RANK must be a rank number or 'all', got {sel!r}") from None


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Configure the ``sst_dist`` logger for this rank (silent on ranks that do not log)."""
    logger = logging.getLogger("sst_dist")
    logger.handlers.clear()
    logger.propagate = False
    enabled = log_rank_enabled()
    logger.setLevel(level if enabled else logging.ERROR)
    prefix = f"[rank {D.rank()}] " if os.environ.get("SST_LOG_RANK", "").lower() == "all" else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(fmt)
    logger.addHandler(h)
    if log_file is not None and enabled:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = _SafeFileHandler(log_file)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


class _SafeFileHandler(logging.FileHandler):
    """A log file handler that refuses to append through a planted link."""

    def _open(self):  # type: ignore[override]
        return open_append(self.baseFilename)


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite metrics.jsonl keeping only records with ``step <= step``; returns how many went.

    A torn last line (a crash mid-write) is dropped as well."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if rec_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(x + "\n" for x in kept))
    return dropped


class MetricsWriter:
    """Append-only metrics.jsonl plus TensorBoard scalars; a no-op on ranks that do not log.

    ``keep_upto``: the global step the run continues from; records (and TensorBoard events) of
    later steps, written by an interrupted run after its last checkpoint, are dropped first.
    ``None`` keeps everything (a writer that only adds to a finished run).
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, keep_upto: int | None = None) -> None:
        self.enabled = D.rank() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self._file = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_upto is not None:
            gone = drop_records_after(self.path, keep_upto)
            if gone:
                logging.getLogger("sst_dist").info(
                    "metrics.jsonl: dropped %d record(s) after step %d (logged after the checkpoint)",
                    gone,
                    keep_upto,
                )
        self._file = open_append(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if keep_upto is None else keep_upto + 1
                events = ensure_own_dir(Path(run_dir) / "tensorboard")  # never a planted link
                self.tb = SummaryWriter(str(events), purge_step=purge)
            except UnsafePathError:
                raise
            except Exception as e:  # tensorboard missing or broken: keep the JSONL record
                logging.getLogger("sst_dist").warning("TensorBoard disabled: %s", e)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:  # written to after close(): reopen (e.g. an evaluation after training)
            self._file = open_append(self.path)
        rec = {"kind": kind, "step": step, "time": time.time(), **values}
        self._file.write(json.dumps(rec, default=float) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tb is not None:
            self.tb.close()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class StepLine:
    """The periodic training line: ``step 120/800 (epoch 1, 20/400) loss 1.2345 lr 1e-04
    35.2 img/s data wait 12% ETA 0:04:10``. ``waited`` adds time spent fetching a batch; the rate,
    data-wait share and ETA cover the steps since the previous line (the ETA: the rest of the run
    at that pace, evaluations not included)."""

    def __init__(self, total_steps: int, step: int) -> None:
        self.total = total_steps
        self.last_step, self.last_t = step, time.perf_counter()
        self.wait, self.images = 0.0, 0

    def waited(self, seconds: float) -> None:
        """Time this rank spent waiting for its next batch."""
        self.wait += seconds

    def done(self, images: int) -> None:
        """A step over ``images`` images (all ranks) finished."""
        self.images += images

    def line(self, step: int, epoch: int, i: int, n: int, loss: float, lr: float) -> str:
        """The line for global ``step`` (``i`` of ``n`` in ``epoch``); starts the next interval."""
        now = time.perf_counter()
        dt, steps = max(1e-9, now - self.last_t), max(1, step - self.last_step)
        eta = dt / steps * max(0, self.total - step)
        text = (f"step {step}/{self.total} (epoch {epoch}, {i}/{n}) loss {loss:.4f} lr {lr:.3g} "
                f"{self.images / dt:.1f} img/s data wait {100 * min(1.0, self.wait / dt):.0f}% "
                f"ETA {_clock(eta)}")
        self.last_step, self.last_t, self.wait, self.images = step, now, 0.0, 0
        return text


class Ticker:
    """``emit("<what> 30/100 (30%), 0:00:12")`` about every tenth of ``total`` items and at the
    end: evaluation and prediction progress a batch-job log can show (no terminal needed)."""

    def __init__(self, what: str, total: int, emit: Any, parts: int = 10) -> None:
        self.what, self.total, self.emit = what, max(0, int(total)), emit
        self.every = max(1, -(-self.total // parts)) if self.total else 1
        self.done, self.start = 0, time.perf_counter()

    def tick(self, k: int = 1) -> None:
        before, self.done = self.done, self.done + k
        if self.done // self.every > before // self.every or (self.total and self.done == self.total):
            pct = f" ({100 * self.done // self.total}%)" if self.total else ""
            total = f"/{self.total}" if self.total else ""
            self.emit(f"{self.what} {self.done}{total}{pct}, {_clock(time.perf_counter() - self.start)}")


class Progress:
    """tqdm bar over an epoch showing images/s and the running losses.

    Shown on the logging rank when stderr is a terminal (or ``SST_PROGRESS=1``), so log files
    of batch jobs stay free of carriage-return spam.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.bar = None
        self.start = time.perf_counter()
        self.images = 0
        tty = sys.stderr.isatty() or os.environ.get("SST_PROGRESS", "") == "1"
        if enabled and tty and log_rank_enabled():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)

    def update(self, images: int, postfix: dict[str, float]) -> float:
        """Advance one step; returns global images/s so far (``images`` already summed over ranks)."""
        self.images += images
        rate = self.images / max(1e-9, time.perf_counter() - self.start)
        if self.bar is not None:
            self.bar.set_postfix({"img/s": f"{rate:.1f}", **{k: f"{v:.4f}" for k, v in postfix.items()}})
            self.bar.update(1)
        return rate

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
