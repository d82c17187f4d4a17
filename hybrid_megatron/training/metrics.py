"""The per-step metrics of a run: loss, lr, throughput, model FLOPs utilisation, memory."""

from __future__ import annotations

import torch

# Dense peak TFLOP/s per GPU (no sparsity), by device-name fragment and precision.
_PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp8": 1979.0, "fp32": 494.5},  # fp32 via TF32
    "H200": {"bf16": 989.0, "fp8": 1979.0, "fp32": 494.5},
}


def peak_flops_per_gpu(precision: str) -> float | None:
    """Peak FLOP/s of this rank's accelerator for ``precision`` (bf16|fp8|fp32); None on CPU
    or an unknown GPU (MFU is then not reported)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for fragment, peaks in _PEAK_TFLOPS.items():
        if fragment in name:
            return peaks[precision] * 1e12
    return None


def flops_per_token(model_config, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward) from the accounting module."""
    from hybrid_megatron.accounting.flops import model_flops_per_token

    return float(model_flops_per_token(model_config, seq_length))


def memory_gib() -> float:
    """Peak GPU memory allocated by this rank (GiB), or the process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class StepMetrics:
    """The figures of each training step (tracked, and read by the loss log) and the run's
    planned totals (tracked as parameters).

    Takes the validated Recipe and the world size. MFU is None where the accelerator's peak is
    unknown (CPU).
    """

    def __init__(self, recipe, world_size: int):
        self.seq_length = recipe.data.seq_length
        self.tokens_per_step = recipe.train.global_batch_size * self.seq_length
        self.flops_per_token = flops_per_token(recipe.model, self.seq_length)
        self.peak = peak_flops_per_gpu("fp8" if recipe.model.fp8 else recipe.train.precision)
        self.world_size = world_size

    def planned(self, model_config, total_steps: int) -> dict:
        """Parameters (total, active, non-embedding), tokens and training FLOPs of a
        ``total_steps`` run."""
        from hybrid_megatron.accounting import count_parameters

        params = count_parameters(model_config)
        return {
            "model.num_parameters": params.total,
            "model.active_parameters": params.active,
            "model.non_embedding_parameters": params.non_embedding,
            "train.tokens": total_steps * self.tokens_per_step,
            "train.flops": self.flops_per_token * total_steps * self.tokens_per_step,
        }

    def of_step(self, state, loss: float, lr: float, grad_norm, seconds: float) -> dict:
        """The ``train/*`` metrics of the step that brought training to ``state`` (a
        TrainingState), given its loss, the lr its update used, its gradient norm (None when
        skipped) and its wall time."""
        tokens_per_s = self.tokens_per_step / seconds
        return {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": None if grad_norm is None else float(grad_norm),
            "train/tokens_per_s": tokens_per_s,
            "train/mfu": self.flops_per_token * tokens_per_s / (self.peak * self.world_size)
            if self.peak
            else None,
            "train/tokens_seen": state.consumed_samples * self.seq_length,
            "train/flops_seen": self.flops_per_token * state.consumed_samples * self.seq_length,
            "train/memory_gib": memory_gib(),
            "train/skipped_steps": state.skipped_steps,
        }
