"""Bind the pure-PyTorch Mamba2 path into megatron-core's MambaMixer when mamba-ssm is absent.

``megatron.core.ssm.mamba_mixer`` imports mamba-ssm's Triton SSD kernels, its gated RMSNorm and
causal-conv1d at import time; without them it binds MagicMocks and refuses to build the mixer.
This module rebinds those module-level names to the PyTorch ops of :mod:`hybrid_megatron.ops`
(same signatures and semantics), so the unchanged MambaMixer runs on CPU (and on a GPU without
the kernels, slowly). With the kernels present nothing is done.
"""

from __future__ import annotations

_BOUND = False


def _sharded_rms_norm_gated():
    """The PyTorch gated RMSNorm with megatron-core's checkpoint sharding (weight split by TP).

    megatron-core's ExtendedRMSNorm subclasses mamba-ssm's norm; without mamba-ssm it was built
    on a MagicMock at import time and is unusable, so it is rebuilt here on the PyTorch norm.
    """
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    from hybrid_megatron.ops import RMSNormGated

    class ShardedRMSNormGated(RMSNormGated):
        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            """Checkpoint entry for the weight, sharded along axis 0 across TP."""
            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets
            )

    return ShardedRMSNormGated


def mamba_kernels_are_native() -> bool:
    """Return True when megatron-core bound mamba-ssm's and causal-conv1d's real kernels."""
    from megatron.core.ssm import mamba_mixer

    if _BOUND:  # our own PyTorch path is bound
        return False
    return bool(mamba_mixer.HAVE_MAMBA_SSM) and mamba_mixer.causal_conv1d_fn is not None


def bind_torch_mamba_kernels() -> None:
    """Rebind MambaMixer's kernel names to the PyTorch SSD path; idempotent. Returns nothing."""
    global _BOUND
    if _BOUND:
        return
    from megatron.core.ssm import mamba_mixer

    from hybrid_megatron import ops

    ShardedRMSNormGated = _sharded_rms_norm_gated()

    mamba_mixer.RMSNormGated = ops.RMSNormGated
    mamba_mixer.ExtendedRMSNorm = ShardedRMSNormGated
    mamba_mixer.mamba_chunk_scan_combined = ops.mamba_chunk_scan_combined
    mamba_mixer.mamba_split_conv1d_scan_combined = ops.mamba_split_conv1d_scan_combined
    mamba_mixer.causal_conv1d_fn = ops.causal_conv1d_fn
    mamba_mixer.causal_conv1d_update = ops.causal_conv1d_update
    mamba_mixer.selective_state_update = ops.selective_state_update
    mamba_mixer.HAVE_MAMBA_SSM = True
    _BOUND = True
