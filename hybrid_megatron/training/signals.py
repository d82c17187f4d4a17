"""Graceful stop on SIGTERM / SIGUSR1: finish the step, save, then hand over to the launcher."""

from __future__ import annotations

import signal
from typing import Optional


class GracefulStop:
    """Records a termination signal so the loop can checkpoint before the process ends.

    SLURM sends SIGUSR1 (``--signal``) before the time limit and SIGTERM on preemption. The
    handler only sets a flag; after the loop has saved, :meth:`hand_over` calls the handler that
    was installed before (submitit's, which requeues the job), so saving comes first.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def install(self) -> "GracefulStop":
        """Install the handlers (main thread only); returns self."""
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        self.received = signum
        self._frame = frame

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.received is not None

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def hand_over(self) -> None:
        """Restore the previous handlers and call the one for the received signal, if callable."""
        previous = self._previous.get(self.received)
        self.restore()
        if callable(previous):
            previous(self.received, getattr(self, "_frame", None))
