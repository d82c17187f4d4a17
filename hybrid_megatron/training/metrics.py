"""Throughput, model FLOPs utilisation and memory figures for the training log."""

from __future__ import annotations

from typing import Optional

import torch

# Dense peak TFLOP/s per GPU (no sparsity), by device-name fragment and precision.
_PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp8": 1979.0, "fp32": 494.5},  # fp32 via TF32
    "H200": {"bf16": 989.0, "fp8": 1979.0, "fp32": 494.5},
}


def peak_flops_per_gpu(precision: str) -> Optional[float]:
    """Peak FLOP/s of this rank's accelerator for ``precision`` (bf16|fp8|fp32); None on CPU
    or an unknown GPU (MFU is then not reported)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for fragment, peaks in _PEAK_TFLOPS.items():
        if fragment in name:
            return peaks[precision] * 1e12
    return None


def flops_per_token(model_config, seq_length: int) -> Optional[float]:
    """Training FLOPs per token (forward + backward) from the accounting module."""
    from hybrid_megatron.accounting.flops import model_flops_per_token

    return float(model_flops_per_token(model_config, seq_length))


def memory_gib() -> float:
    """Peak GPU memory allocated by this rank (GiB), or the process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30
