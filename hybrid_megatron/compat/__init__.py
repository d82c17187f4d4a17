"""The only place where megatron-core 0.16.1 is adapted to a machine without CUDA.

Each shim is a small, documented replacement of one CUDA-only spot (see ``cpu.py``) and of the
mamba-ssm / causal-conv1d kernels that megatron-core's MambaMixer binds at import time (see
``mamba_kernels.py``). Nothing here runs when CUDA and the kernels are present.
"""

from hybrid_megatron.compat.cpu import apply_cpu_shims, cpu_shims_applied
from hybrid_megatron.compat.mamba_kernels import bind_torch_mamba_kernels, mamba_kernels_are_native


def apply_compat_shims() -> None:
    """Apply every shim this machine needs; idempotent.

    Takes nothing, returns nothing. Without CUDA: the CPU shims; without mamba-ssm's kernels:
    the pure-PyTorch SSD path bound into megatron-core's MambaMixer.
    """
    if not __import__("torch").cuda.is_available():
        apply_cpu_shims()
    if not mamba_kernels_are_native():
        bind_torch_mamba_kernels()


__all__ = [
    "apply_compat_shims",
    "apply_cpu_shims",
    "cpu_shims_applied",
    "bind_torch_mamba_kernels",
    "mamba_kernels_are_native",
]
