"""The loss log: every step's exact loss in ``train_log.jsonl`` and a progress line now and then."""

from __future__ import annotations

import json
from pathlib import Path

from hybrid_megatron.logs import get_logger, log_rank0

LOSS_LOG = "train_log.jsonl"

log = get_logger(__name__)


class LossLog:
    """Appends one JSON line per step to ``<run_dir>/train_log.jsonl`` (rank 0) and logs a
    progress line at step 1 and every ``log_interval`` steps.

    The record holds the loss as a float hex string, so resumed runs can be compared with an
    uninterrupted one bit for bit, plus ``tokens_per_s`` and ``mfu`` (the scale-out bench reads
    them) and, on the steps that have them, the ``moe/*`` expert-load figures. A resumed run
    appends; a re-run step appears twice and the last line counts.
    """

    def __init__(self, run_dir: str | Path, log_interval: int, total_steps: int, active: bool):
        self.path = Path(run_dir) / LOSS_LOG
        self.log_interval = log_interval
        self.total_steps = total_steps
        self.active = active

    def record(self, step: int, metrics: dict) -> bool:
        """Log step ``step``'s metrics (``StepMetrics.of_step``); returns whether a progress
        line was logged (the moment to send tracked metrics too)."""
        loss, tokens_per_s, mfu = metrics["train/loss"], metrics["train/tokens_per_s"], metrics["train/mfu"]
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
        if step % self.log_interval and step != 1:
            return False
        log_rank0(
            log,
            f"step {step}/{self.total_steps} loss {loss:.4f} lr {metrics['train/lr']:.2e} "
            f"grad_norm {metrics['train/grad_norm'] or float('nan'):.3f} "
            f"tokens/s {tokens_per_s:,.0f}"
            + (f" mfu {mfu:.1%}" if mfu else "")
            + f" mem {metrics['train/memory_gib']:.2f}GiB",
        )
        return True
