"""Graceful stop on SIGTERM / SIGUSR1: finish the step, save, then hand over to the launcher."""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist


class GracefulStop:
    """Records a termination signal so the loop can checkpoint before the process ends.

    SLURM sends SIGUSR1 (``--signal``) before the time limit and SIGTERM on preemption. The
    handler only sets a flag; after the loop has saved, :meth:`hand_over` calls the handler that
    was installed before (submitit's, which requeues the job), so saving comes first.

    Signals reach the ranks of a job at different moments, so a rank's own flag can flip one
    step before another's; the loop asks :meth:`agreed` (one all-reduce) so that every rank
    stops after the same step and they save together.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopping = False
        self._previous: dict[int, Any] = {}  # signal -> the handler it had before install()

    def install(self) -> GracefulStop:
        """Install the handlers (main thread only); returns self."""
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        self.received = signum
        self._frame = frame

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived in this process."""
        return self.received is not None

    def agreed(self) -> bool:
        """True on every rank once any rank of the job has received a stop signal.

        Collective when torch.distributed is initialised (every rank must call it at the same
        point of the loop, e.g. once per step): an all-reduce (MAX) of the ranks' flags. The
        answer stays True once given and is kept in ``stopping``.
        """
        if not self.stopping:
            self.stopping = self.requested
            if dist.is_available() and dist.is_initialized():
                device = "cuda" if dist.get_backend() == "nccl" else "cpu"
                flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                self.stopping = bool(flag.item())
        return self.stopping

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def hand_over(self) -> None:
        """Restore the previous handlers and call the one for the received signal, if callable."""
        previous = self._previous.get(self.received) if self.received is not None else None
        self.restore()
        if callable(previous):
            previous(self.received, getattr(self, "_frame", None))
