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

Under context parallelism (``pg_collection.cp`` of more than one rank) both run in one of two
modes, the constructor's ``context_parallel_mode``:

- ``heads``: megatron-core's MambaContextParallel, unchanged: an all-to-all gives each CP rank
  the whole sequence for ``nheads / (tp * cp)`` heads (so cp must divide the local heads);
- ``sequence``: every rank keeps all of its TP rank's heads and scans only its own slices of
  the sequence (megatron-core's 2 x CP chunk order); the conv halos and the states entering
  each slice come from one small all-gather each (:mod:`hybrid_megatron.ops.ssd_context_parallel`),
  so CP is not bounded by the head count.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from einops import rearrange
from megatron.core.ssm import mamba_mixer
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from hybrid_megatron.models.sharding import split_sharded_tensor
from hybrid_megatron.ops import causal_conv1d_fn as torch_causal_conv1d_fn
from hybrid_megatron.ops.ssd_chunked import NO_DT_LIMIT, process_dt
from hybrid_megatron.ops.ssd_context_parallel import (
    SequenceShards,
    all_gather_autograd,
    causal_conv1d_sequence_sharded,
    ssd_sequence_sharded,
)

CONTEXT_PARALLEL_MODES = ("heads", "sequence")


class _OneRankGroup:
    """A process group of one rank, where megatron-core only asks a group's size and rank.

    Handed to MambaMixer's constructor as its CP group in sequence mode, so that its
    MambaContextParallel keeps every local head and moves no activations.
    """

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


class _MambaMixer(MambaMixer):
    """megatron-core's MambaMixer with its gated RMSNorm epsilon set to ``norm_epsilon`` and a
    choice of context-parallel mode.

    ``context_parallel_mode``: ``heads`` (megatron-core's head sharding, the default) or
    ``sequence`` (sequence-sharded scan over ``pg_collection.cp``); see the module docstring.
    Every other argument is MambaMixer's.
    """

    def __init__(self, config, *args, context_parallel_mode: str = "heads", **kwargs):
        if context_parallel_mode not in CONTEXT_PARALLEL_MODES:
            raise ValueError(
                f"context_parallel_mode must be one of {CONTEXT_PARALLEL_MODES}, "
                f"got {context_parallel_mode!r}"
            )
        pg_collection = kwargs.get("pg_collection")
        sequence = context_parallel_mode == "sequence" and pg_collection is not None
        if sequence:
            heads_unsharded = copy.copy(pg_collection)
            heads_unsharded.cp = _OneRankGroup()
            kwargs["pg_collection"] = heads_unsharded
        super().__init__(config, *args, **kwargs)
        self.context_parallel_mode = context_parallel_mode
        # The CP group this mixer shards the sequence over (None: megatron-core's own path).
        self.sequence_cp_group = None
        if sequence:
            self.pg_collection = pg_collection
            if pg_collection.cp.size() > 1:
                self.sequence_cp_group = pg_collection.cp
        if self.rmsnorm:
            # MambaMixer builds the norm with eps=1e-5 whatever the config says; both the
            # mamba-ssm kernel and the PyTorch one (ops/rmsnorm_gated.py) read ``eps`` at call time.
            self.norm.eps = config.layernorm_epsilon

    def _ssm_training(self, zxBCdt, packed_seq_params=None):
        """MambaMixer's training SSM, or in sequence mode the sequence-sharded one."""
        if self.sequence_cp_group is None:
            return super()._ssm_training(zxBCdt, packed_seq_params)
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported with sequence-mode Mamba CP")
        return self._ssm_sequence_sharded(zxBCdt)

    def _ssm_prefill(self, zxBCdt, conv_state=None, ssm_state=None, **kwargs):
        """MambaMixer's unfused SSM, or in sequence mode the sequence-sharded one (no cache)."""
        if self.sequence_cp_group is None:
            return super()._ssm_prefill(zxBCdt, conv_state, ssm_state, **kwargs)
        cached = conv_state is not None or ssm_state is not None
        if cached or any(v is not None and v is not False for v in kwargs.values()):
            raise NotImplementedError("cached inference is not supported with sequence-mode Mamba CP")
        return self._ssm_sequence_sharded(zxBCdt)

    def _ssm_sequence_sharded(self, zxBCdt: torch.Tensor) -> torch.Tensor:
        """conv1d, SSD scan and gated norm of this CP rank's slices: [l, b, d] -> [l, b, d_inner].

        The unfused path with the kernels megatron-core bound (mamba-ssm's, or the PyTorch ones
        of :mod:`hybrid_megatron.ops`), each slice's conv halo and incoming state gathered from
        the CP group.
        """
        group = self.sequence_cp_group
        shards = SequenceShards.load_balanced(group.rank(), group.size())

        def gather(t: torch.Tensor) -> torch.Tensor:
            return all_gather_autograd(t, group)

        groups = self.ngroups_local_tp * self.d_state
        zxBCdt = rearrange(zxBCdt, "l b d -> b l d")
        z, xBC, dt = torch.split(
            zxBCdt, [self.d_inner_local_tp, self.d_inner_local_tp + 2 * groups, self.nheads_local_tp], dim=-1
        )
        conv = mamba_mixer.causal_conv1d_fn or torch_causal_conv1d_fn
        weight = rearrange(self.conv1d.weight, "d 1 w -> d w")
        xBC = causal_conv1d_sequence_sharded(
            xBC, weight, self.conv1d.bias, self.activation, shards, gather, conv=conv
        )
        x, B, C = torch.split(xBC, [self.d_inner_local_tp, groups, groups], dim=-1)
        # dt is processed here, once, so that the scan and the state correction read the same dt.
        dt = process_dt(dt, self.dt_bias.float(), True, NO_DT_LIMIT, torch.float32)
        A = -torch.exp(self.A_log.float())
        D = rearrange(self.D.float(), "(h p) -> h p", p=self.headdim) if self.D_has_hdim else self.D
        y = ssd_sequence_sharded(
            rearrange(x, "b l (h p) -> b l h p", p=self.headdim),
            dt,
            A,
            rearrange(B, "b l (g n) -> b l g n", n=self.d_state),
            rearrange(C, "b l (g n) -> b l g n", n=self.d_state),
            self.chunk_size,
            D,
            shards,
            gather,
            scan=mamba_mixer.mamba_chunk_scan_combined,
        )
        y = rearrange(y, "b l h p -> l b (h p)").contiguous()
        z = rearrange(z, "b l d -> l b d").contiguous()
        if self.rmsnorm:
            return self.norm(y, z)
        return y * F.silu(z)


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
