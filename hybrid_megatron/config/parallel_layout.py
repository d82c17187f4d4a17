"""Whether a model can be laid out on a parallel layout: the sizes TP, PP, CP and EP must shard.

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


def check_parallel_layout(
    cfg: ModelConfig, parallel: ParallelConfig, tp: int, ep: int, cp: int | None = None
) -> None:
    """Raise ModelConfigError (naming the field) for sizes the parallel layout cannot shard.

    Takes the model config, the parallel config and the TP, EP and CP sizes (CP default
    ``parallel.cp``). Used by the builder and, before any job is submitted, by the recipe
    validation.
    """
    cp = parallel.cp if cp is None else cp
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
    if cp > 1 and (any(c in pattern for c in ATTENTION_LETTERS) or INTRA in pattern):
        _check_attention_cp(cfg, parallel, tp, cp)
    if MAMBA in pattern:
        heads = cfg.mamba.expand * cfg.hidden_size // cfg.mamba.head_dim
        if (cfg.mamba.expand * cfg.hidden_size) % cfg.mamba.head_dim or heads % tp:
            raise ModelConfigError(
                f"model.mamba.head_dim: {heads} Mamba heads (expand*hidden/head_dim) must be a "
                f"whole number divisible by parallel.tp={tp}"
            )
        _check_mamba_groups(heads, cfg.mamba.num_groups, "Mamba blocks'")
        if cp > 1 and parallel.mamba_cp == "heads":
            _check_mamba_heads_cp(heads, cfg.mamba.num_groups, tp, cp, "Mamba blocks'")
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
            if cp > 1 and parallel.mamba_cp == "heads":
                _check_mamba_heads_cp(m_heads, cfg.mamba.num_groups, tp, cp, "intra block's Mamba branch's")
        if cp > 1 and parallel.cp_comm == "a2a" and aw:
            for name, count in (("attention heads", a_heads), ("query groups", groups)):
                if count % (tp * cp):
                    raise ModelConfigError(
                        f"parallel.cp_comm: a2a splits the intra block's {count} {name} over "
                        f"tp*cp = {tp}*{cp} ranks; they do not divide (use p2p or all_gather)"
                    )
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


def _check_attention_cp(cfg: ModelConfig, parallel: ParallelConfig, tp: int, cp: int) -> None:
    """Context-parallel rules of the attention layers: a2a splits heads over tp*cp ranks, and
    Transformer Engine's p2p ring has no sliding window."""
    if cfg.attention is None:
        return
    if parallel.cp_comm == "a2a" and any(c in build_layer_pattern(cfg) for c in ATTENTION_LETTERS):
        for name, count in (("num_heads", cfg.attention.num_heads), ("num_query_groups", cfg.query_groups)):
            if count % (tp * cp):
                raise ModelConfigError(
                    f"parallel.cp_comm: a2a splits model.attention.{name} ({count}) over tp*cp = "
                    f"{tp}*{cp} ranks; it does not divide (use p2p or all_gather)"
                )
    if cfg.attention.sliding_window and parallel.cp_comm == "p2p":
        raise ModelConfigError(
            "parallel.cp_comm: p2p (Transformer Engine's ring) does not take "
            "model.attention.sliding_window; use all_gather or a2a"
        )


def _check_mamba_heads_cp(heads: int, groups: int, tp: int, cp: int, where: str) -> None:
    """Raise ModelConfigError unless megatron-core's head-sharded Mamba context parallelism can
    split ``heads`` SSM heads and ``groups`` B/C groups over ``cp`` ranks of each of ``tp``."""
    if heads % (tp * cp):
        raise ModelConfigError(
            f"parallel.mamba_cp: heads mode splits the {where} {heads} SSM heads over tp*cp = "
            f"{tp}*{cp} ranks; they do not divide (cp must divide {heads // tp}; mamba_cp "
            f"sequence has no such cap)"
        )
    local_groups = groups // tp
    if local_groups % cp and cp % local_groups:
        raise ModelConfigError(
            f"parallel.mamba_cp: heads mode needs the {where} {local_groups} B/C groups per TP "
            f"rank (model.mamba.num_groups {groups} / tp {tp}) to divide or be divided by cp {cp}"
        )


def check_sequence_split(seq_length: int, parallel: ParallelConfig) -> None:
    """Raise ModelConfigError naming ``data.seq_length`` unless every sequence splits into the
    2 x cp chunks of context parallelism and, with sequence parallelism, each rank's part splits
    over tp."""
    cp, tp = parallel.cp, parallel.tp
    if cp > 1 and seq_length % (2 * cp):
        raise ModelConfigError(
            f"data.seq_length: {seq_length} does not split into 2*cp = {2 * cp} equal chunks "
            f"(parallel.cp={cp})"
        )
    if parallel.sequence_parallel and (seq_length // cp) % tp:
        raise ModelConfigError(
            f"data.seq_length: each of parallel.cp={cp} ranks holds {seq_length // cp} positions, "
            f"which do not split over parallel.tp={tp} (parallel.sequence_parallel)"
        )
