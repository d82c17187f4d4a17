"""megatron-core ModuleSpecs for each block type, for both implementations.

Every block is a megatron-core TransformerLayer: an input RMSNorm, a mixer in the
``self_attention`` slot, a residual add, then the FFN sublayer (pre-norm + MLP or MoE; SwiGLU
for flavour llama, relu2 for nemotron_h, set in the TransformerConfig). The block letter picks
the sublayers:

- ``A``: megatron-core SelfAttention (GQA, causal, optional sliding window; RoPE for flavour
  llama, no position embedding for nemotron_h) + FFN
- ``M``: megatron-core MambaMixer (via MambaSublayer) + FFN when ``mamba_block_ffn``
- ``H``: IntraHybridMixer (attention and Mamba2 branches, fused) + FFN
- ``*``: attention only; ``-``: dense MLP only; ``E``: MoE only (empty slots are megatron-core
  identity ops, as in its own hybrid MLP layers)

Under context parallelism (``context_parallel_size > 1``) TE's attention splits the sequence
itself; the local build's attention core is AllGatherKVAttention (megatron-core's local
attention has none), and the Mamba mixers are told the ``parallel.mamba_cp`` mode.

``impl`` picks the building blocks through megatron-core's backend spec providers: ``te``
(Transformer Engine: fused norm+linear, TE attention, FP8) or ``local`` (megatron-core's own
layers, CPU). Checkpoint keys are the same for both (``sharded_state_dict_keys_map`` maps the
local norms onto TE's fused-norm names), so a checkpoint moves between implementations.
"""

from __future__ import annotations

import dataclasses

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from hybrid_megatron.config.layer_pattern import (
    ATTENTION_LETTERS,
    INTRA,
    MAMBA,
    ffn_is_moe,
    has_ffn,
    has_mixer,
)
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.models.context_parallel_attention import AllGatherKVAttention
from hybrid_megatron.models.intra import IntraHybridMixer, IntraHybridSubmodules
from hybrid_megatron.models.mamba import MambaBranch, MambaSublayer, PassThroughProjection
from hybrid_megatron.models.moe import GroupedExperts
from hybrid_megatron.models.norms import LocalRMSNorm
from hybrid_megatron.models.transformer_config import intra_branch_configs


def backend_for(impl: str) -> BackendSpecProvider:
    """Return megatron-core's spec provider for ``"te"`` or ``"local"``."""
    if impl == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def rms_norm_spec(backend: BackendSpecProvider):
    """The RMSNorm module: TE's fused norm, or LocalRMSNorm (sequence-parallel capable)."""
    if backend.fuse_layernorm_and_linear():
        return backend.layer_norm(rms_norm=True)
    return LocalRMSNorm


def _input_projection(backend: BackendSpecProvider):
    """(input norm spec, column-parallel input projection) with TE's norm fused when possible."""
    if backend.fuse_layernorm_and_linear():
        return IdentityOp, backend.column_parallel_layer_norm_linear()
    return LocalRMSNorm, backend.column_parallel_linear()


def _attention_spec(
    backend: BackendSpecProvider, core_attention, cp_comm: str | None, passthrough: bool = False
) -> ModuleSpec:
    """megatron-core SelfAttention around ``core_attention``; ``cp_comm`` is TE's context-parallel
    exchange (None without CP); ``passthrough`` drops its projections (intra branch)."""
    _, qkv = _input_projection(backend)
    params: dict = {"attn_mask_type": AttnMaskType.causal}
    if cp_comm is not None:
        params["cp_comm_type"] = cp_comm
    return ModuleSpec(
        module=SelfAttention,
        params=params,
        submodules=SelfAttentionSubmodules(
            linear_qkv=PassThroughProjection if passthrough else qkv,
            core_attention=core_attention,
            linear_proj=PassThroughProjection if passthrough else backend.row_parallel_linear(),
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def _ffn(backend: BackendSpecProvider, moe, with_ffn: bool, ffn_size: int):
    """(pre-FFN norm spec, FFN spec, keys map) for a dense MLP of width ``ffn_size``, an MoE
    (``moe``: the MoEConfig, None for dense), or no FFN."""
    if not with_ffn:
        return IdentityOp, IdentityOp, {}
    mlp = get_mlp_module_spec_for_backend(
        backend,
        num_experts=moe.num_experts if moe else None,
        moe_grouped_gemm=bool(moe and moe.experts == "te_grouped"),
    )
    if moe is not None and moe.experts == "grouped":
        mlp = dataclasses.replace(
            mlp, submodules=dataclasses.replace(mlp.submodules, experts=ModuleSpec(module=GroupedExperts))
        )
    if moe is None:
        # the width megatron-core's MLP would default to (from the config), given: the default warns
        mlp = dataclasses.replace(mlp, params={**mlp.params, "ffn_hidden_size": ffn_size})
    if moe is None and backend.fuse_layernorm_and_linear():
        return IdentityOp, mlp, {}
    keys = {} if moe else {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    return rms_norm_spec(backend), mlp, keys


def _core_attention(backend: BackendSpecProvider, impl: str, tconfig: TransformerConfig):
    """The attention core: the backend's, except on the local build under context parallelism."""
    if impl != "te" and tconfig.context_parallel_size > 1:
        return AllGatherKVAttention
    return backend.core_attention()


def mamba_mixer_params(cfg: ModelConfig, context_parallel_mode: str | None = None) -> dict:
    """MambaMixer constructor arguments from ``model.mamba`` (the rest comes from the config)
    and, under context parallelism only, ``context_parallel_mode`` (``parallel.mamba_cp``:
    heads | sequence); None (CP 1) leaves the mixer's arguments as they are."""
    params: dict[str, int | str] = {
        "expand": cfg.mamba.expand,
        "d_conv": cfg.mamba.conv_kernel,
        "chunk_size": cfg.mamba.chunk_size,
    }
    if context_parallel_mode is not None:
        params["context_parallel_mode"] = context_parallel_mode
    return params


def block_spec(
    letter: str,
    cfg: ModelConfig,
    tconfig: TransformerConfig,
    impl: str,
    parallel: ParallelConfig | None = None,
) -> ModuleSpec:
    """The TransformerLayer spec of one block.

    Takes the block letter (A, M, H, ``*``, ``-`` or E), the ModelConfig, the model's
    TransformerConfig, the impl (``te`` | ``local``) and the ParallelConfig (its ``cp_comm`` and
    ``mamba_cp`` apply when the config's ``context_parallel_size`` > 1); returns a ModuleSpec
    that megatron-core's TransformerBlock builds.
    """
    parallel = parallel or ParallelConfig()
    backend = backend_for(impl)
    with_ffn = has_ffn(cfg, letter)
    pre_ffn_norm, ffn, keys = _ffn(
        backend, cfg.moe if ffn_is_moe(cfg, letter) else None, with_ffn, tconfig.ffn_hidden_size
    )
    # FFN-only layers (- and E) keep TransformerLayer's defaults for the mixer slots: no input
    # norm, no mixer, no mixer residual.
    mixer_fields = {}
    if has_mixer(letter):
        input_norm, mixer, mixer_keys = _mixer(letter, cfg, tconfig, backend, impl, parallel)
        mixer_fields = dict(
            input_layernorm=input_norm, self_attention=mixer, self_attn_bda=get_bias_dropout_add
        )
        keys = {**mixer_keys, **keys}
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            **mixer_fields,
            pre_mlp_layernorm=pre_ffn_norm,
            mlp=ffn,
            mlp_bda=get_bias_dropout_add if with_ffn else IdentityFuncOp,
            sharded_state_dict_keys_map=keys,
        ),
    )


def _mixer(
    letter: str,
    cfg: ModelConfig,
    tconfig: TransformerConfig,
    backend: BackendSpecProvider,
    impl: str,
    parallel: ParallelConfig,
):
    """(input norm spec, mixer spec, checkpoint keys map) of a block with a mixer (A, ``*``, M, H)."""
    input_norm, in_proj = _input_projection(backend)
    core_attention = _core_attention(backend, impl, tconfig)
    with_cp = tconfig.context_parallel_size > 1
    cp_comm = parallel.cp_comm if with_cp else None
    cp_mode = parallel.mamba_cp if with_cp else None
    if letter in ATTENTION_LETTERS:
        mixer = _attention_spec(backend, core_attention, cp_comm)
        mixer_keys = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    elif letter == MAMBA:
        mixer = ModuleSpec(
            module=MambaSublayer,
            params={"d_model": cfg.hidden_size, **mamba_mixer_params(cfg, cp_mode)},
            submodules=MambaMixerSubmodules(in_proj=in_proj, out_proj=backend.row_parallel_linear()),
        )
        mixer_keys = {"input_layernorm.": "self_attention.in_proj.layer_norm_"}
    elif letter == INTRA:
        attention_cfg, mamba_cfg = intra_branch_configs(cfg, tconfig)
        mixer = ModuleSpec(
            module=IntraHybridMixer,
            params={
                "attention_config": attention_cfg,
                "mamba_config": mamba_cfg,
                "fusion": cfg.intra.fusion,
                "branch_norm": cfg.intra.branch_norm,
                "branch_scalars": cfg.intra.branch_scalars,
                "overlap_branches": cfg.intra.overlap_branches,
            },
            submodules=IntraHybridSubmodules(
                in_proj=in_proj,
                attention=_attention_spec(backend, core_attention, cp_comm, passthrough=True),
                mamba=ModuleSpec(
                    module=MambaBranch,
                    params=mamba_mixer_params(cfg, cp_mode),
                    submodules=MambaMixerSubmodules(
                        in_proj=PassThroughProjection, out_proj=PassThroughProjection
                    ),
                ),
                out_proj=backend.row_parallel_linear(),
            ),
        )
        mixer_keys = {"input_layernorm.": "self_attention.in_proj.layer_norm_"}
    else:
        raise ValueError(f"unknown block letter {letter!r} (expected A, M, H, *, - or E)")
    # TE fuses the input norm into the mixer's in-projection: nothing to map then.
    return input_norm, mixer, ({} if input_norm is IdentityOp else mixer_keys)
