"""Mamba2 mixers as TransformerLayer sublayers, reusing megatron-core's MambaMixer unchanged.

``MambaSublayer`` is the mixer of a Mamba block: megatron-core's MambaMixer (its own in/out
projections, conv1d, SSD scan, gated RMSNorm) given TransformerLayer's calling convention, so a
Mamba block is a TransformerLayer whose ``self_attention`` slot holds it and whose ``mlp`` slot
holds the block's FFN.

``MambaBranch`` is the Mamba2 branch of the intra-layer hybrid block: the same MambaMixer with
pass-through projections, because the hybrid block owns one fused in-projection and one fused
out-projection shared with the attention branch.

Both take their gated RMSNorm's epsilon from the model's ``norm_epsilon`` (the config's
``layernorm_epsilon``), where megatron-core's MambaMixer fixes it at 1e-5.
"""

from __future__ import annotations

import torch
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from hybrid_megatron.models.sharding import split_sharded_tensor


class _MambaMixer(MambaMixer):
    """megatron-core's MambaMixer with its gated RMSNorm epsilon set to ``norm_epsilon``."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self.rmsnorm:
            # MambaMixer builds the norm with eps=1e-5 whatever the config says; both the
            # mamba-ssm kernel and the PyTorch one (ops/rmsnorm_gated.py) read ``eps`` at call time.
            self.norm.eps = config.layernorm_epsilon


class MambaSublayer(_MambaMixer):
    """megatron-core MambaMixer callable from TransformerLayer's attention slot."""

    def forward(self, hidden_states, attention_mask=None, inference_context=None, **unused):
        """Run the mixer on ``hidden_states`` [s, b, h]; returns (output, bias) like attention.

        Attention-only arguments (mask, rotary embeddings, ...) are accepted and ignored: the
        SSM is causal by construction and position-free.
        """
        return super().forward(
            hidden_states,
            inference_context=inference_context,
            packed_seq_params=unused.get("packed_seq_params"),
        )


class PassThroughProjection(torch.nn.Module):
    """Stands in for a linear layer whose work the enclosing block does; returns (x, None)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        """Return ``(x, None)``, the (output, bias) pair a megatron linear layer returns."""
        return x, None


class MambaBranch(_MambaMixer):
    """MambaMixer fed with its already-projected z,x,B,C,dt; returns the gated, normed SSD output.

    Built with PassThroughProjection for ``in_proj`` and ``out_proj``. Its checkpoint holds the
    conv1d, A_log, dt_bias, D and gated-norm weight; the projections are checkpointed by the
    hybrid block that owns them.
    """

    @property
    def in_proj_sections(self) -> list[tuple[str, int]]:
        """Local (per TP rank) row sections of this branch's share of the fused in-projection."""
        groups = self.ngroups_local_tp * self.d_state
        return [
            ("z", self.d_inner_local_tp),
            ("x", self.d_inner_local_tp),
            ("B", groups),
            ("C", groups),
            ("dt", self.nheads_local_tp),
        ]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """TP-sharded checkpoint entries of the branch's own parameters (no projections).

        MambaMixer's version expects its in_proj weight, which lives in the hybrid block here;
        this one shards the same tensors the same way, conv1d split into x, B, C.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        out = make_sharded_tensors_for_checkpoint(
            own, prefix, {"A_log": 0, "dt_bias": 0, "D": 0}, sharded_offsets
        )
        groups = self.ngroups_local_tp * self.d_state
        conv_sd = make_sharded_tensors_for_checkpoint(
            self.conv1d.state_dict(prefix="", keep_vars=True),
            f"{prefix}conv1d.",
            {"weight": 0, "bias": 0},
            sharded_offsets,
        )
        for name, sharded in conv_sd.items():
            out[name] = split_sharded_tensor(
                sharded, [self.d_inner_local_tp, groups, groups], ["x", "B", "C"], 0
            )
        if self.rmsnorm:
            out.update(sharded_state_dict_default(self.norm, f"{prefix}norm.", sharded_offsets, metadata))
        return out
