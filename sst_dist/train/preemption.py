"""Preemption: a signal asks the run to checkpoint at the next step boundary and stop.

SLURM sends ``SIGUSR1`` to every task some time before a job's end when the job asks for it
(``#SBATCH --signal=USR1@120``, see launch/slurm/train.sbatch); ``kill -USR1`` does the same by
hand. The handler only sets a flag. The ranks agree on it with one all-reduce per step, so they
all save the same mid-epoch checkpoint and stop together; the command then exits with
:data:`EXIT_PREEMPTED` and a rerun with ``--resume`` continues from that step. SIGTERM is left
alone: launchers send it to tear a failed job down, when a collective save would hang.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch

from sst_dist.train import distributed as D

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; train.sbatch requeues the job on it
SIGNALS = (signal.SIGUSR1,)


class Preempted(Exception):
    """Raised by the trainer after it saved the checkpoint a preemption signal asked for."""


class PreemptionFlag:
    """Set by a signal handler (installed on the main thread only), read collectively."""

    def __init__(self) -> None:
        self._set = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only live on the main thread
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._set = True

    def request(self) -> None:
        """Ask for a stop as a signal would (for tests and embedding code)."""
        self._set = True

    @property
    def requested(self) -> bool:
        """This process was signalled (the trainer packs it into the step's one all-reduce)."""
        return self._set

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was signalled (one all-reduce of one number)."""
        flag = torch.tensor([1.0 if self._set else 0.0], device=device)
        return bool(D.all_reduce_sum(flag).item() > 0)
