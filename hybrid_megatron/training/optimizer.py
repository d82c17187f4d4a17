"""Optimizer and learning-rate schedule from the recipe's ``train:`` section."""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from hybrid_megatron.config.train import TrainConfig


def build_optimizer(train: TrainConfig, model_chunks: list):
    """megatron-core's distributed Adam(W) over the model chunks.

    Takes the TrainConfig and the DDP-wrapped chunks; returns a MegatronOptimizer (fp32 master
    weights for bf16 models; gradient clipping at ``clip_grad``; states sharded across DP).
    """
    moments = {}
    if train.adam_moments == "bf16":
        if not torch.cuda.is_available():
            raise RuntimeError("train.adam_moments bf16 needs a GPU (Transformer Engine's fused Adam)")
        moments = dict(
            use_precision_aware_optimizer=True, exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16
        )
    config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=train.precision == "bf16",
        params_dtype=model_chunks[0].module.config.params_dtype
        if hasattr(model_chunks[0].module, "config")
        else None,
        use_distributed_optimizer=True,
        **moments,
    )
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(train: TrainConfig, optimizer, total_steps: int) -> OptimizerParamScheduler:
    """Linear warmup to ``lr``, then ``cosine`` / ``wsd`` / ``constant`` decay to ``min_lr``.

    Takes the TrainConfig, the optimizer and the run's total steps; returns megatron-core's
    OptimizerParamScheduler counting in optimizer steps (call ``step(1)`` after each applied
    update; it sets the lr of the optimizer's param groups).

    With T total steps, W = ``warmup_steps`` and n the updates applied so far, the lr is
    ``lr * n / W`` for n <= W, then: cosine ``min_lr + (lr - min_lr) * (1 + cos(pi * (n - W) /
    (T - W))) / 2``; wsd ``lr`` up to n = T - D and ``min_lr + (lr - min_lr) * (T - n) / D``
    after, with D = ``round(T * wsd_decay_fraction)`` (at least 1, at most T - W); constant
    ``lr``. Megatron-core's convention: step s (1-based) trains at n = s - 1, so the first
    step of a warmup runs at lr 0, the peak is first used at step W + 1, and the schedule
    reaches ``min_lr`` at n = T, after the last step.
    """
    style = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[train.schedule]
    extra = {}
    if style == "WSD":
        # The decay never starts inside the warmup (a jump down from the ramp would follow it).
        decay = min(max(1, round(total_steps * train.wsd_decay_fraction)), total_steps - train.warmup_steps)
        extra = dict(wsd_decay_steps=decay, lr_wsd_decay_style="linear")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_steps,
        lr_decay_steps=total_steps,
        lr_decay_style=style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
        **extra,
    )
