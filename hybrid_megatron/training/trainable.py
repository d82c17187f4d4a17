"""What an optimizer step moves: the model chunks, their optimizer and LR schedule.

The Trainer and the throughput benchmark build and step it the same way, so the benchmark
measures the trainer's own step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybrid_megatron.config.train import TrainConfig
from hybrid_megatron.training.optimizer import build_optimizer, build_scheduler
from hybrid_megatron.training.step import train_step


@dataclass
class Trainable:
    """Model chunks wrapped for training (``wrap_for_training``), megatron-core's distributed
    optimizer over them and the LR schedule that sets its lr."""

    model_chunks: list
    optimizer: Any
    scheduler: Any

    @classmethod
    def build(cls, model_chunks: list, train: TrainConfig, total_steps: int) -> Trainable:
        """The optimizer and schedule of ``train`` (a TrainConfig) for a ``total_steps`` run
        over the wrapped ``model_chunks``."""
        optimizer = build_optimizer(train, model_chunks)
        return cls(model_chunks, optimizer, build_scheduler(train, optimizer, total_steps))

    @property
    def lr(self) -> float:
        """The lr the next update uses (the schedule set it after the previous one)."""
        return self.optimizer.param_groups[0]["lr"]

    def step(self, micro_batches: list, seq_length: int):
        """One optimizer step on this rank's micro-batches; returns ``train_step``'s
        ``(loss, grad_norm, applied)``."""
        return train_step(self.model_chunks, self.optimizer, self.scheduler, micro_batches, seq_length)
