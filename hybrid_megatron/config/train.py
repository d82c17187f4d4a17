"""The recipe's ``train:`` section: batch sizes, budget, optimizer, schedule and numerics.

Example (YAML)::

    train:
      global_batch_size: 256        # samples per optimizer step, over all data-parallel ranks
      micro_batch_size: 4           # samples per forward/backward on one rank
      tokens: 102B                  # or steps: 50000 (exactly one of the two)
      lr: 3.0e-4
      min_lr: 3.0e-5
      schedule: wsd                 # cosine | wsd | constant
      warmup_steps: 2000
      wsd_decay_fraction: 0.2

Budgets accept plain numbers, scientific notation (``1e9``) and K/M/B/T suffixes (``102B``).
The trainer (``hybrid_megatron.training``) is the consumer; `derived` turns the budget into steps.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from hybrid_megatron.config.base import StrictSection

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(value: Any) -> Any:
    """Parse a count such as ``102B``, ``1.5e9``, ``500_000`` or ``2M`` into an int.

    Takes a number or string; returns an int when the text is a count (whole number), else the
    value unchanged so pydantic reports the type error. Raises ValueError for a fractional count.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "").replace(",", "")
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBgGtT]?)", text)
        if not match:
            return value
        number = float(match.group(1)) * _SUFFIX.get(match.group(2).lower(), 1)
        value = number
    if isinstance(value, float):
        if value != int(value):
            raise ValueError(f"expected a whole number, got {value}")
        return int(value)
    return value


class TrainConfig(StrictSection):
    """Optimisation settings of one training run (the recipe's ``train:`` section)."""

    global_batch_size: int = Field(gt=0, description="samples per optimizer step (all DP ranks)")
    micro_batch_size: int = Field(default=1, gt=0, description="samples per forward/backward per rank")
    steps: int | None = Field(default=None, gt=0, description="optimizer steps (or give tokens)")
    tokens: int | None = Field(
        default=None, gt=0, description="token budget; steps = ceil(tokens / (gbs * seq_length))"
    )
    lr: float = Field(gt=0, description="peak learning rate")
    min_lr: float = Field(default=0.0, ge=0, description="learning rate at the end of decay")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        default="cosine", description="cosine decay, warmup-stable-decay, or constant after warmup"
    )
    warmup_steps: int = Field(default=0, ge=0, description="linear warmup from 0 to lr")
    wsd_decay_fraction: float = Field(
        default=0.2, gt=0, le=1, description="wsd: share of the steps spent in the final decay"
    )
    weight_decay: float = Field(default=0.1, ge=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.95, ge=0, lt=1)
    adam_eps: float = Field(default=1e-8, gt=0)
    clip_grad: float = Field(default=1.0, ge=0, description="global grad-norm clip; 0 disables")
    adam_moments: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="dtype of Adam's two moment estimates. bf16 (GPU, train.precision bf16): "
        "megatron-core's precision-aware optimizer with TE's fused Adam, 4 bytes per parameter "
        "less, for models whose optimizer state does not fit otherwise (large MoE on few GPUs)",
    )
    seed: int = Field(default=1234, description="model init, dropout and data-order seed")
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="training precision (bf16: mixed precision on GPU)"
    )
    log_interval: int = Field(default=10, gt=0, description="steps between log lines")
    eval_interval: int = Field(default=1000, ge=0, description="steps between validations; 0: never")
    eval_iters: int = Field(default=10, ge=0, description="validation batches per evaluation")
    max_consecutive_nan_skips: int = Field(
        default=5, gt=0, description="non-finite-loss steps skipped in a row before aborting"
    )
    deterministic: bool = Field(
        default=False, description="deterministic kernels and ordering (bitwise-reproducible on CPU)"
    )
    recompute: Literal["none", "selective", "full"] = Field(
        default="none",
        description="activation recomputation: selective = the attention core of every layer "
        "(megatron-core's 'core_attn'), full = each whole layer's activations (least memory)",
    )
    cuda_graphs: bool = Field(
        default=False,
        description="GPU: capture every layer's forward and backward in CUDA graphs after the "
        "first step (megatron-core's per-layer graphs); cuts the host's kernel-launch time. "
        "Needs a GPU, dense FFNs or model.moe.experts grouped on one EP rank, recompute none "
        "and tp = pp = 1",
    )

    @field_validator("steps", "tokens", mode="before")
    @classmethod
    def _parse_counts(cls, value: Any) -> Any:
        return parse_count(value)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("train: give exactly one of train.steps and train.tokens")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr: {self.min_lr} is larger than train.lr {self.lr}")
        if self.steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(
                f"train.warmup_steps: {self.warmup_steps} must be smaller than train.steps {self.steps}"
            )
        if self.adam_moments == "bf16" and self.precision != "bf16":
            raise ValueError("train.adam_moments: bf16 moments need train.precision bf16")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size: {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size {self.micro_batch_size}"
            )
        return self
