"""Mamba2 kernels in PyTorch: the stand-ins for mamba-ssm's and causal-conv1d's CUDA/Triton ops.

One module per op, with the signatures and semantics of mamba-ssm 2.2.6 and causal-conv1d 1.7 as
megatron-core 0.16.1's MambaMixer imports them, so the mixer runs unchanged where those kernels are
missing (``hybrid_megatron.compat.mamba_kernels`` binds them). Built from differentiable torch ops:
autograd gives the backward pass, any device runs them. ``ssd_minimal`` is the short reference the
chunked scan is tested against.
"""

from hybrid_megatron.ops.causal_conv1d import (
    causal_conv1d_fn,
    causal_conv1d_update,
    causal_conv1d_varlen_states,
)
from hybrid_megatron.ops.rmsnorm_gated import RMSNormGated, rmsnorm_fn
from hybrid_megatron.ops.selective_state_update import selective_state_update
from hybrid_megatron.ops.split_conv1d_scan import mamba_split_conv1d_scan_combined
from hybrid_megatron.ops.ssd_chunked import mamba_chunk_scan_combined
from hybrid_megatron.ops.ssd_minimal import ssd_minimal

__all__ = [
    "mamba_chunk_scan_combined",
    "mamba_split_conv1d_scan_combined",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "causal_conv1d_varlen_states",
    "selective_state_update",
    "rmsnorm_fn",
    "RMSNormGated",
    "ssd_minimal",
]
