"""Validation: the loss on a fixed held-out set, every ``train.eval_interval`` steps and at the end."""

from __future__ import annotations

from hybrid_megatron.logs import get_logger, log_rank0
from hybrid_megatron.training.step import evaluate

log = get_logger(__name__)


class Validation:
    """Evaluates the model on ``batches`` (``validation_batches``: the same global batches
    every time, so the losses of a run compare) and tracks ``val/loss``.

    Takes the batches (None: no validation), ``train.eval_interval`` (0: only at the end), the
    sequence length and the RunTracker. ``loss`` is the latest validation loss (None before
    the first).
    """

    def __init__(self, batches: list | None, interval: int, seq_length: int, tracker):
        self.batches = batches
        self.interval = interval
        self.seq_length = seq_length
        self.tracker = tracker
        self.loss: float | None = None

    def after_step(self, model_chunks, step: int) -> None:
        """Validate and log the loss when ``step`` is a multiple of the interval."""
        if self.batches and self.interval and step % self.interval == 0:
            self._run(model_chunks, step)
            log_rank0(log, f"step {step}: validation loss {self.loss:.4f}")

    def at_end(self, model_chunks, step: int) -> None:
        """Validate the final model unless the last step already did (the summary reports it)."""
        if self.batches and (self.loss is None or step % max(self.interval, 1)):
            self._run(model_chunks, step)

    def _run(self, model_chunks, step: int) -> None:
        assert self.batches is not None  # callers run only with a validation set
        self.loss = evaluate(model_chunks, self.batches, self.seq_length)
        self.tracker.log_metrics({"val/loss": self.loss}, step)
