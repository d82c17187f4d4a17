"""build_model: ModelConfig -> a megatron-core GPTModel holding this pipeline stage's blocks."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from hybrid_megatron.config.errors import ModelConfigError
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.models.layer_pattern import build_layer_pattern, split_pattern
from hybrid_megatron.models.moe import keep_token_counts_on_device
from hybrid_megatron.models.output_layer import use_fp8_output_layer
from hybrid_megatron.models.specs import backend_for, block_spec, rms_norm_spec
from hybrid_megatron.models.transformer_config import build_transformer_config, resolve_impl


def check_parallel_layout(cfg: ModelConfig, parallel: ParallelConfig, tp: int, ep: int) -> None:
    """Raise ModelConfigError (naming the field) for sizes the parallel layout cannot shard.

    Takes the model config, the parallel config and the TP and EP sizes. Used by the builder
    and, before any job is submitted, by the recipe validation.
    """
    pattern = build_layer_pattern(cfg)
    split_pattern(pattern, parallel.pp, parallel.pipeline_stage_layers)
    if cfg.moe is not None and tp > 1 and not parallel.sequence_parallel:
        # megatron-core refuses MoE with TP but without SP (the experts' token all-gather).
        raise ModelConfigError("parallel.sequence_parallel: MoE with tp > 1 needs it set to true")
    if parallel.sequence_parallel and tp == 1:
        raise ModelConfigError("parallel.sequence_parallel: needs tp > 1")
    if cfg.vocab_size % tp:
        raise ModelConfigError(f"model.vocab_size: {cfg.vocab_size} does not split over parallel.tp={tp}")
    if cfg.fp8_output_layer and (cfg.vocab_size // tp) % 16:
        raise ModelConfigError(
            f"model.fp8_output_layer: each of parallel.tp={tp} ranks holds {cfg.vocab_size // tp} "
            f"vocabulary rows; FP8 GEMMs need a multiple of 16"
        )
    if cfg.moe is None and ep > 1:
        raise ModelConfigError(f"parallel.ep: {ep} > 1 needs model.moe")
    if parallel.expert_tp is not None:
        if cfg.moe is None:
            raise ModelConfigError(f"parallel.expert_tp: {parallel.expert_tp} needs model.moe")
        # The two expert layouts that are tested: split like the dense layers, or whole experts.
        if parallel.expert_tp not in (1, tp):
            raise ModelConfigError(
                f"parallel.expert_tp: {parallel.expert_tp} must be 1 (whole experts) or parallel.tp={tp}"
            )
    if cfg.attention is not None and ("A" in pattern or "*" in pattern):
        if cfg.attention.num_heads % tp:
            raise ModelConfigError(
                f"model.attention.num_heads: {cfg.attention.num_heads} heads do not split over "
                f"parallel.tp={tp}"
            )
        if cfg.query_groups % tp:
            raise ModelConfigError(
                f"model.attention.num_query_groups: {cfg.query_groups} groups do not split over "
                f"parallel.tp={tp}"
            )
    if "M" in pattern:
        heads = cfg.mamba.expand * cfg.hidden_size // cfg.mamba.head_dim
        if (cfg.mamba.expand * cfg.hidden_size) % cfg.mamba.head_dim or heads % tp:
            raise ModelConfigError(
                f"model.mamba.head_dim: {heads} Mamba heads (expand*hidden/head_dim) must be a "
                f"whole number divisible by parallel.tp={tp}"
            )
        _check_mamba_groups(heads, cfg.mamba.num_groups, "Mamba blocks'")
    if "M" in pattern or "H" in pattern:
        if cfg.mamba.num_groups % tp:
            raise ModelConfigError(
                f"model.mamba.num_groups: {cfg.mamba.num_groups} groups do not split over parallel.tp={tp}"
            )
    if "H" in pattern:
        from hybrid_megatron.models.transformer_config import intra_branch_widths

        try:
            aw, mw = intra_branch_widths(cfg)
        except ValueError as err:
            raise ModelConfigError(str(err)) from None
        a_heads, m_heads = aw // cfg.head_dim, mw // cfg.mamba.head_dim
        groups = cfg.intra.num_query_groups or a_heads
        for name, count in (("attention heads", a_heads), ("query groups", groups if aw else 0),
                            ("mamba heads", m_heads)):
            if count % tp:
                raise ModelConfigError(
                    f"model.intra.dim_ratio: the intra block's {count} {name} do not split over "
                    f"parallel.tp={tp}"
                )
        if m_heads:
            _check_mamba_groups(m_heads, cfg.mamba.num_groups, "intra block's Mamba branch's")
    if cfg.moe is not None and cfg.moe.num_experts % ep:
        raise ModelConfigError(
            f"model.moe.num_experts: {cfg.moe.num_experts} experts do not split over parallel.ep={ep}"
        )


def _check_mamba_groups(heads: int, groups: int, where: str) -> None:
    """Raise ModelConfigError unless ``heads`` SSM heads split evenly into ``groups`` B/C groups
    (each group is shared by a whole number of heads). ``where`` names the mixer."""
    if heads % groups:
        raise ModelConfigError(
            f"model.mamba.num_groups: the {where} {heads} SSM heads do not split into {groups} groups"
        )


def _pipeline_layout(stages: list[str]) -> Optional[list[list[str]]]:
    """megatron-core's explicit layout for uneven stages (None when the split is even)."""
    if len({len(s) for s in stages}) == 1:
        return None
    layout = [["decoder"] * len(s) for s in stages]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


def build_model(
    model_config: ModelConfig,
    pre_process: bool = True,
    post_process: bool = True,
    parallel: Optional[ParallelConfig] = None,
    bf16: bool = False,
    recompute: str = "none",
    cuda_graphs: bool = False,
) -> GPTModel:
    """Build this rank's part of the language model.

    Takes the validated ModelConfig, whether this pipeline stage holds the embedding
    (``pre_process``) and the output layer (``post_process``), the ParallelConfig (for
    sequence parallelism and explicit per-stage layer counts; sizes are read from megatron-core's
    initialised parallel state), whether training runs in bf16, the activation recomputation
    (``train.recompute``: none | selective | full) and whether layers run in CUDA graphs
    (``train.cuda_graphs``; GPU only). megatron-core's model-parallel state and RNG tracker must
    be initialised (``setup_model_parallel``, with the same ``cuda_graphs``).

    Returns a megatron-core GPTModel with GPTModel's calling convention:
    ``forward(input_ids, position_ids, attention_mask, labels=None)`` gives logits [b, s, v/tp]
    or, with labels, the per-token loss [b, s]. Raises ModelConfigError (or pydantic's
    ValidationError upstream) naming the bad field.
    """
    parallel = parallel or ParallelConfig()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    check_parallel_layout(model_config, parallel, tp, ep)
    if cuda_graphs and not torch.cuda.is_available():
        raise ModelConfigError("train.cuda_graphs: needs a GPU (this process sees no CUDA device)")

    pattern = build_layer_pattern(model_config)
    stages = split_pattern(pattern, pp, parallel.pipeline_stage_layers)
    stage_pattern = stages[parallel_state.get_pipeline_model_parallel_rank()]

    tconfig: TransformerConfig = build_transformer_config(
        model_config,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_layout=_pipeline_layout(stages),
        bf16=bf16,
        recompute=recompute,
        cuda_graphs=cuda_graphs,
    )
    impl = resolve_impl(model_config)
    block = TransformerBlockSubmodules(
        layer_specs=[block_spec(letter, model_config, tconfig, impl) for letter in stage_pattern],
        layer_norm=rms_norm_spec(backend_for(impl)),
    )
    # NemotronH attention has no position embedding at all; llama attention uses RoPE.
    rope = model_config.flavour == "llama" and any(c in pattern for c in "AH*")
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block,
        vocab_size=model_config.vocab_size,
        max_sequence_length=model_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model_config.tie_embeddings,
        position_embedding_type="rope" if rope else "none",
        rotary_base=int(model_config.attention.rotary_base) if rope else 10000,
    )
    if model_config.fp8_output_layer and post_process and impl == "te":
        # Not on a local build (impl auto without a GPU): there FP8 is off altogether.
        use_fp8_output_layer(model)
    if model_config.moe is not None and model_config.moe.experts == "grouped":
        keep_token_counts_on_device(model)
    model.layer_pattern = pattern
    model.stage_pattern = stage_pattern
    return model
