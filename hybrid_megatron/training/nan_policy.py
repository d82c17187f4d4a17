"""The NaN policy: a step with a non-finite loss is skipped; too many in a row abort the run."""

from __future__ import annotations

from hybrid_megatron.logs import get_logger, log_rank0
from hybrid_megatron.training.checkpoint import TrainingState

log = get_logger(__name__)


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite losses in a row); names the step."""


class NanPolicy:
    """Counts skipped steps in the TrainingState (so a resumed run keeps counting) and aborts
    after ``max_consecutive`` skips in a row (``train.max_consecutive_nan_skips``).

    A lone spike is survivable (the update is dropped on every rank, see ``train_step``); a
    run of them means the model has diverged and more steps would only burn the allocation.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive

    def record(self, state: TrainingState, loss: float, applied: bool) -> None:
        """Note whether the step ``state.step`` applied its update (it did not for a non-finite
        ``loss``). Raises TrainingAborted at the ``max_consecutive``-th skip in a row."""
        if applied:
            state.consecutive_nan_skips = 0
            return
        state.skipped_steps += 1
        state.consecutive_nan_skips += 1
        log_rank0(
            log,
            f"step {state.step}: non-finite loss {loss}; update skipped "
            f"({state.consecutive_nan_skips} in a row)",
        )
        if state.consecutive_nan_skips >= self.max_consecutive:
            raise TrainingAborted(
                f"step {state.step}: {state.consecutive_nan_skips} non-finite losses in a "
                f"row (train.max_consecutive_nan_skips={self.max_consecutive})"
            )
