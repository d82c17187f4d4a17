"""The loss log: every step's exact loss in ``train_log.jsonl`` and a progress line now and then."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from hybrid_megatron.logs import get_logger, log_rank0

LOSS_LOG = "train_log.jsonl"

log = get_logger(__name__)


def clock_text(seconds: float) -> str:
    """``seconds`` as ``H:MM:SS`` (hours unbounded), rounded to the second."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def progress_text(step: int, total: int, elapsed: float, seconds_per_step: float) -> str:
    """How far a run is and how long it has left: ``"50% elapsed 0:01:05 left 0:01:05"`` for step
    ``step`` of ``total``, ``elapsed`` seconds into this process's training, with the remaining
    steps taking ``seconds_per_step`` each."""
    return (
        f"{step / total:.0%} elapsed {clock_text(elapsed)} "
        f"left {clock_text((total - step) * seconds_per_step)}"
    )


class LossLog:
    """Appends one JSON line per step to ``<run_dir>/train_log.jsonl`` (rank 0) and logs a
    progress line at step 1, every ``log_interval`` steps and the last step, ending in
    :func:`progress_text`.

    The time left is at the pace of the steps after this process's first (which also pays for
    warm-up: compilation, CUDA graph capture); at the first step, at that step's pace. Times
    count from this object's creation (``clock``: seconds, monotonic), just before training.

    The record holds the loss as a float hex string, so resumed runs can be compared with an
    uninterrupted one bit for bit, plus ``tokens_per_s`` and ``mfu`` (the scale-out bench reads
    them) and, on the steps that have them, the ``moe/*`` expert-load figures. A resumed run
    appends; a re-run step appears twice and the last line counts.
    """

    def __init__(
        self,
        run_dir: str | Path,
        log_interval: int,
        total_steps: int,
        active: bool,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path = Path(run_dir) / LOSS_LOG
        self.log_interval = log_interval
        self.total_steps = total_steps
        self.active = active
        self.clock = clock
        self.started = clock()
        self.first: tuple[int, float] | None = None  # (step, time) at this process's first step

    def record(self, step: int, metrics: dict) -> bool:
        """Log step ``step``'s metrics (``StepMetrics.of_step``); returns whether a progress
        line was logged (the moment to send tracked metrics too)."""
        loss, tokens_per_s, mfu = metrics["train/loss"], metrics["train/tokens_per_s"], metrics["train/mfu"]
        now = self.clock()
        if self.first is None:
            self.first = (step, now)
        if self.active:
            with self.path.open("a") as f:
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": loss.hex() if isinstance(loss, float) else loss,
                            "tokens_per_s": tokens_per_s,
                            "mfu": mfu,
                            **{k: v for k, v in metrics.items() if k.startswith("moe/")},
                        }
                    )
                    + "\n"
                )
        if step % self.log_interval and step not in (1, self.total_steps):
            return False
        log_rank0(
            log,
            f"step {step}/{self.total_steps} loss {loss:.4f} lr {metrics['train/lr']:.2e} "
            f"grad_norm {metrics['train/grad_norm'] or float('nan'):.3f} "
            f"tokens/s {tokens_per_s:,.0f}"
            + (f" mfu {mfu:.1%}" if mfu else "")
            + f" mem {metrics['train/memory_gib']:.2f}GiB | "
            + progress_text(step, self.total_steps, now - self.started, self._seconds_per_step(step, now)),
        )
        return True

    def _seconds_per_step(self, step: int, now: float) -> float:
        """The pace since this process's first step (that step's own before a second one)."""
        assert self.first is not None
        first_step, first_time = self.first
        if step > first_step:
            return (now - first_time) / (step - first_step)
        return first_time - self.started
