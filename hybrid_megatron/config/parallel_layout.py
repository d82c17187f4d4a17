"""Whether a model can be laid out on a parallel layout: the sizes TP, PP and EP must shard.

Pure arithmetic on the recipe (no megatron-core, no process group): the recipe's validation runs
it before any job is submitted, and ``build_model`` runs it again with the sizes of the
initialised parallel state.
"""

from __future__ import annotations

from hybrid_megatron.config.errors import ModelConfigError
from hybrid_megatron.config.geometry import intra_branch_widths
from hybrid_megatron.config.layer_pattern import (
    ATTENTION_LETTERS,
    INTRA,
    MAMBA,
    build_layer_pattern,
    split_pattern,
)
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig


def check_parallel_layout(cfg: ModelConfig, parallel: ParallelConfig, tp: int, ep: int) -> None:
    """Raise ModelConfigError (naming the field) for sizes the parallel layout cannot shard.

    Takes the model config, the parallel config and the TP and EP sizes. Used by the builder
    and, before any job is submitted, by the recipe validation.
    """
    pattern = build_layer_pattern(cfg)
    if parallel.pp_split == "balanced":
        if parallel.pp > len(pattern):
            raise ModelConfigError(f"parallel.pp: {parallel.pp} stages for {len(pattern)} blocks")
    else:
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
    if cfg.attention is not None and any(c in pattern for c in ATTENTION_LETTERS):
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
    if MAMBA in pattern:
        heads = cfg.mamba.expand * cfg.hidden_size // cfg.mamba.head_dim
        if (cfg.mamba.expand * cfg.hidden_size) % cfg.mamba.head_dim or heads % tp:
            raise ModelConfigError(
                f"model.mamba.head_dim: {heads} Mamba heads (expand*hidden/head_dim) must be a "
                f"whole number divisible by parallel.tp={tp}"
            )
        _check_mamba_groups(heads, cfg.mamba.num_groups, "Mamba blocks'")
    if MAMBA in pattern or INTRA in pattern:
        if cfg.mamba.num_groups % tp:
            raise ModelConfigError(
                f"model.mamba.num_groups: {cfg.mamba.num_groups} groups do not split over parallel.tp={tp}"
            )
    if INTRA in pattern:
        try:
            aw, mw = intra_branch_widths(cfg)
        except ValueError as err:
            raise ModelConfigError(str(err)) from None
        a_heads, m_heads = aw // cfg.head_dim, mw // cfg.mamba.head_dim
        groups = cfg.intra.num_query_groups or a_heads
        for name, count in (
            ("attention heads", a_heads),
            ("query groups", groups if aw else 0),
            ("mamba heads", m_heads),
        ):
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
