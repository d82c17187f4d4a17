"""ModelConfig (recipe) -> megatron-core TransformerConfig, for the model and for each branch.

The only place where recipe fields become megatron-core config fields.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.activations import squared_relu
from megatron.core.transformer.transformer_config import TransformerConfig

from hybrid_megatron.config.geometry import intra_branch_widths
from hybrid_megatron.config.model import ModelConfig


def resolve_impl(cfg: ModelConfig) -> str:
    """Return ``"te"`` or ``"local"``: the configured impl, or for ``auto`` TE when CUDA and
    Transformer Engine are both usable."""
    if cfg.impl != "auto":
        return cfg.impl
    return "te" if torch.cuda.is_available() and have_transformer_engine() else "local"


def have_transformer_engine() -> bool:
    """Whether Transformer Engine's PyTorch package imports (takes nothing)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _window(cfg: ModelConfig) -> tuple[int, int] | None:
    # megatron-core/TE windows are (left, right) offsets; a window of W tokens sees itself + W-1.
    w = cfg.attention.sliding_window if cfg.attention is not None else None
    return (w - 1, 0) if w else None


def build_transformer_config(
    cfg: ModelConfig,
    sequence_parallel: bool = False,
    pipeline_layout: list | None = None,
    bf16: bool = False,
    recompute: str = "none",
    cuda_graphs: bool = False,
) -> TransformerConfig:
    """Translate the model section into megatron-core's TransformerConfig.

    Takes the ModelConfig, whether sequence parallelism is on, an optional megatron-core
    pipeline layout (explicit per-stage layer counts), whether training runs in bf16, the
    activation recomputation (``train.recompute``: none | selective | full) and whether every
    layer runs in CUDA graphs (``train.cuda_graphs``); reads
    TP/CP/PP/EP sizes from megatron-core's initialised parallel state (the attention's CP
    exchange, ``parallel.cp_comm``, is a parameter of the attention specs, so that it reaches
    attention modules only). Returns the config shared by
    every layer (per-branch configs of the intra block derive from it).
    """
    attention = cfg.attention
    moe = cfg.moe
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_size,
        # megatron-core requires heads divisible by TP even when no layer has attention (mamba).
        num_attention_heads=attention.num_heads
        if attention
        else parallel_state.get_tensor_model_parallel_world_size(),
        num_query_groups=cfg.query_groups if attention else None,
        kv_channels=cfg.head_dim if attention else None,
        window_size=_window(cfg),
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        # FFNs and experts: llama SwiGLU (gated, silu); nemotron_h relu2 (non-gated, squared ReLU)
        gated_linear_unit=cfg.gated_ffn,
        activation_func=F.silu if cfg.gated_ffn else squared_relu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **fused_kernel_fields(cfg),
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        init_method_std=cfg.init_method_std,
        mamba_state_dim=cfg.mamba.state_dim,
        mamba_head_dim=cfg.mamba.head_dim,
        mamba_num_groups=cfg.mamba.num_groups,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_layout=pipeline_layout,
        # Without CUDA, weights are initialised on the host at full size and then sliced (so
        # they do not depend on the TP size); on GPUs each rank initialises its own shard there.
        use_cpu_initialization=not torch.cuda.is_available(),
        # Checkpoint keys per layer ("layers.<i>.") instead of one tensor stacked over layers:
        # hybrid stacks mix block types, so layers do not share one set of keys.
        hetereogenous_dist_checkpoint=True,
        params_dtype=torch.bfloat16 if cfg.params_dtype == "bf16" else torch.float32,
        bf16=bf16,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # The whole layer when graphs are on (they are off unless cuda_graph_impl is set);
        # megatron-core's default "full" means the same but is deprecated.
        cuda_graph_scope=[],
    )
    if moe is not None:
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            # megatron-core normalises top-1 routing scores only with the softmax first.
            moe_router_pre_softmax=moe.top_k == 1,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size or cfg.ffn_size,
            moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
            moe_token_dispatcher_type=_dispatcher(moe.token_dispatcher),
            moe_grouped_gemm=moe.experts == "te_grouped",
            moe_router_score_function=cfg.moe_score_function,
            moe_router_enable_expert_bias=cfg.moe_expert_bias,
            moe_router_bias_update_rate=moe.expert_bias_update_rate,
            moe_router_topk_scaling_factor=moe.topk_scaling_factor,
        )
    if cfg.fp8 is not None:
        kwargs.update(fp8=cfg.fp8, fp8_recipe="delayed", fp8_dot_product_attention=cfg.fp8_attention)
        if moe is not None and moe.experts != "grouped":
            # TE's FP8 GEMMs need row counts in multiples of 16: the router pads each expert's
            # tokens (GroupedExperts pads its groups itself).
            kwargs.update(moe_router_padding_for_quantization=True)
    kwargs.update(_recompute_fields(recompute))
    if cuda_graphs:
        # megatron-core's own per-layer graphs ("local"): each TransformerLayer records its
        # forward and backward in the first step and replays them from then on; the schedule
        # (forward_backward_no_pipelining) captures them at the end of that step, each the whole
        # layer, mixer and FFN (the empty scope above).
        kwargs.update(cuda_graph_impl="local")
    return TransformerConfig(**kwargs)


def fused_kernel_fields(cfg: ModelConfig) -> dict:
    """megatron-core's kernel-fusion fields for the model: all on for the TE build (they need
    Transformer Engine on a GPU), all off for the local (CPU) build, which uses plain ops.

    Takes the ModelConfig; returns TransformerConfig keyword arguments.
    """
    fused = resolve_impl(cfg) == "te"
    moe = cfg.moe is not None
    return dict(
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused,
        # SwiGLU in one compiled kernel each way (megatron-core's bias_swiglu) instead of silu,
        # mul and their backward as separate passes; relu2 has no fused form there.
        bias_activation_fusion=fused and cfg.gated_ffn,
        # The LM loss through TE's one-pass cross-entropy kernel: megatron-core's unfused
        # vocab_parallel_cross_entropy makes about six fp32 passes over the [tokens x vocab]
        # logits each way (4 GB per 8K-token micro-batch at a 128K vocabulary).
        cross_entropy_loss_fusion=fused,
        cross_entropy_fusion_impl="te",
        # MoE: TE's fused top-k routing with its aux-loss scores, and TE's fused token permute
        # and unpermute (one kernel each way instead of index/sort/scatter chains per layer).
        # Not the fused router where FP8 experts need the router's padding: megatron-core 0.16's
        # dispatcher pads the routing map in place, and TE's fused top-k keeps that map for its
        # backward, which then fails ("modified by an inplace operation").
        moe_router_fusion=fused and moe and (cfg.fp8 is None or cfg.moe.experts == "grouped"),
        moe_permute_fusion=fused and moe,
    )


def _recompute_fields(recompute: str) -> dict:
    """megatron-core's recompute fields for ``train.recompute``."""
    if recompute == "selective":
        # Only the attention core (softmax(QK^T)V): its activations grow with seq^2 while the
        # recompute costs no GEMM weights; megatron-core's default selective module.
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if recompute == "full":
        # Every layer keeps only its input and recomputes the rest in backward (one layer per
        # checkpoint, so the extra memory is a single layer's activations).
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if recompute != "none":
        raise ValueError(f"train.recompute: expected none, selective or full, got {recompute!r}")
    return {}


def _dispatcher(choice: str) -> str:
    # alltoall needs CUDA streams (../shared/CPU_NOTES.md); allgather runs everywhere.
    if choice == "auto":
        return "alltoall" if torch.cuda.is_available() else "allgather"
    return choice


def intra_branch_configs(
    cfg: ModelConfig, base: TransformerConfig
) -> tuple[TransformerConfig | None, TransformerConfig | None]:
    """Per-branch TransformerConfigs of the intra block (None for a 0-width branch).

    Takes the ModelConfig and the model's TransformerConfig; returns (attention, mamba) configs
    that differ from ``base`` only in the branch's head counts.
    """
    attention_width, mamba_width = intra_branch_widths(cfg)
    attention_cfg = mamba_cfg = None
    if attention_width:
        heads = attention_width // cfg.head_dim
        groups = cfg.intra.num_query_groups or heads
        if heads % groups:
            raise ValueError(
                f"model.intra.num_query_groups: the attention branch's {heads} heads are not "
                f"divisible by {groups} groups"
            )
        attention_cfg = dataclasses.replace(
            base, num_attention_heads=heads, num_query_groups=groups, kv_channels=cfg.head_dim
        )
    if mamba_width:
        mamba_cfg = dataclasses.replace(base, mamba_num_heads=mamba_width // cfg.mamba.head_dim)
    return attention_cfg, mamba_cfg
