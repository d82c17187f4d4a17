"""Which Hugging Face target represents a model exactly, and why the others do not.

Each ``*_blockers`` function takes a ModelConfig and returns the list of reasons (empty when
the target is exact). ``choose_target`` resolves ``auto`` and refuses an inexact explicit
target with one NotExactError listing every reason, so nothing silently different is written.
"""

from __future__ import annotations

from hybrid_megatron.config.geometry import intra_branch_widths
from hybrid_megatron.config.layer_pattern import (
    ATTENTION,
    ATTENTION_LETTERS,
    INTRA,
    MAMBA,
    build_layer_pattern,
    ffn_is_moe,
    has_ffn,
)
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.errors import InputError

TARGETS = ("nemotron_h", "falcon_h1", "remote_code")


class NotExactError(InputError, ValueError):
    """The requested target cannot hold this model exactly; the message lists why."""


def _geometry(cfg: ModelConfig):
    """(attention heads, query groups, head_dim, mamba d_inner) of A/M blocks."""
    attn = (cfg.attention.num_heads, cfg.query_groups, cfg.head_dim) if cfg.attention else None
    return attn, cfg.mamba.expand * cfg.hidden_size


def falcon_h1_geometry(cfg: ModelConfig) -> dict:
    """The one attention and one Mamba geometry a Falcon-H1 export uses for every layer.

    Takes the ModelConfig; returns ``{"attention": (heads, groups, head_dim) or None,
    "mamba_width": int or None}`` taken from the H blocks when there are any, else from the
    A and M blocks.
    """
    pattern = build_layer_pattern(cfg)
    attn, d_inner = _geometry(cfg)
    geo = {
        "attention": attn if ATTENTION in pattern else None,
        "mamba_width": d_inner if MAMBA in pattern else None,
    }
    if INTRA in pattern:
        aw, mw = intra_branch_widths(cfg)
        heads = aw // cfg.head_dim
        geo["intra"] = (
            (heads, cfg.intra.num_query_groups or heads, cfg.head_dim) if aw else None,
            mw or None,
        )
    return geo


def falcon_h1_blockers(cfg: ModelConfig) -> list[str]:
    """Reasons a Falcon-H1 export of ``cfg`` would not be the same model (empty: exact)."""
    reasons = []
    pattern = build_layer_pattern(cfg)
    if cfg.moe is not None:
        reasons.append("model.moe: Falcon-H1 has only dense SwiGLU FFNs")
    if cfg.attention is not None and cfg.attention.sliding_window:
        reasons.append("model.attention.sliding_window: Falcon-H1 attention is full causal")
    if cfg.attention is None:
        reasons.append("model.attention: a pure Mamba stack has no attention branch; use nemotron_h")
    if cfg.flavour != "llama":
        reasons.append(
            f"model.flavour: Falcon-H1 layers are llama-flavoured (RoPE, SwiGLU); this model is {cfg.flavour}"
        )
    if INTRA in pattern:
        if cfg.intra.branch_norm != "none":
            reasons.append(
                "model.intra.branch_norm: a per-branch RMSNorm on the branch outputs has no "
                "Falcon-H1 counterpart (its branches sum right after their own projections)"
            )
        geo = falcon_h1_geometry(cfg)
        intra_attn, intra_mamba = geo["intra"]
        if intra_attn is None or intra_mamba is None:
            reasons.append("model.intra.dim_ratio: Falcon-H1 layers need both branches (no 0 share)")
        if geo["attention"] is not None and geo["attention"] != intra_attn:
            reasons.append(
                f"attention blocks: geometry {geo['attention']} (heads, groups, head_dim) differs "
                f"from the intra attention branch's {intra_attn}; Falcon-H1 has one"
            )
        if geo["mamba_width"] is not None and geo["mamba_width"] != intra_mamba:
            reasons.append(
                f"model.intra.mixer_width: the Mamba blocks' d_inner {geo['mamba_width']} differs "
                f"from the intra Mamba branch's {intra_mamba}; Falcon-H1 has one Mamba width"
            )
    return reasons


def nemotron_h_blockers(cfg: ModelConfig) -> list[str]:
    """Reasons a NemotronH export of ``cfg`` would not be the same model (empty: exact).

    NemotronH layers are norm + one mixer (mamba | attention without RoPE | relu2 MLP | sigmoid-
    routed relu2 MoE with a shared expert). Flavour nemotron_h models without sliding windows
    map onto it exactly (every block letter becomes one or two NemotronH layers); of flavour
    llama, only stacks of FFN-free Mamba2 blocks (kind mamba, ``mamba_block_ffn: false``) do.
    """
    reasons = []
    pattern = build_layer_pattern(cfg)
    if INTRA in pattern:
        reasons.append("H blocks: NemotronH has no intra-layer (parallel) hybrid layer")
    attention = any(c in pattern for c in ATTENTION_LETTERS)
    ffn = [c for c in pattern if has_ffn(cfg, c)]
    if cfg.flavour == "llama":
        if attention:
            reasons.append(
                "attention blocks: flavour llama attention uses rotary embeddings (RoPE); "
                "NemotronH attention has none. Set model.flavour: nemotron_h"
            )
        if ffn:
            where = "model.mamba_block_ffn: the Mamba blocks' FFNs" if set(ffn) == {MAMBA} else "FFNs"
            reasons.append(
                f"{where}: flavour llama FFNs are gated SwiGLU (and its MoE softmax-routed); "
                f"NemotronH's are non-gated relu2. Set model.flavour: nemotron_h (or, for a "
                f"pure Mamba stack, mamba_block_ffn: false)"
            )
        return reasons
    if attention and cfg.attention.sliding_window:
        reasons.append("model.attention.sliding_window: NemotronH attention is full causal")
    if any(ffn_is_moe(cfg, c) for c in ffn) and cfg.moe_score_function != "sigmoid":
        reasons.append(
            f"model.moe.score_function: NemotronH's router is sigmoid, this model's is "
            f"{cfg.moe_score_function}"
        )
    return reasons


def remote_code_blockers(cfg: ModelConfig) -> list[str]:
    """Reasons the remote-code export would differ (empty: every llama-flavour option is
    covered)."""
    reasons = []
    # MoE grouped GEMM and TE vs local layers change kernels, not the math: no blocker.
    if cfg.fp8 is not None:
        reasons.append("model.fp8: FP8 training numerics are not reproduced (export is bf16/fp32)")
    if cfg.flavour != "llama":
        reasons.append(
            f"model.flavour: the remote-code model has llama-flavoured layers only (this model is "
            f"{cfg.flavour}; export it with --target nemotron_h)"
        )
    elif cfg.moe is not None and cfg.moe_score_function != "softmax":
        reasons.append("model.moe.score_function: the remote-code router is softmax only")
    elif cfg.moe is not None and cfg.moe.topk_scaling_factor is not None:
        reasons.append("model.moe.topk_scaling_factor: the remote-code router does not scale")
    return reasons


BLOCKERS = {
    "nemotron_h": nemotron_h_blockers,
    "falcon_h1": falcon_h1_blockers,
    "remote_code": remote_code_blockers,
}


def choose_target(cfg: ModelConfig, target: str = "auto") -> tuple[str, str]:
    """Resolve the export target for ``cfg``.

    Takes the ModelConfig and ``auto`` or one of TARGETS. Returns ``(target, why)``: for
    ``auto`` the most widely servable exact target (nemotron_h, then falcon_h1 for stacks of
    intra blocks only, else remote_code). Raises NotExactError naming every reason an
    explicitly requested target is not exact.
    """
    if target == "auto":
        if not nemotron_h_blockers(cfg):
            return "nemotron_h", "exact as NemotronHForCausalLM (native in transformers, vLLM)"
        pattern = build_layer_pattern(cfg)
        if not falcon_h1_blockers(cfg) and set(pattern) == {INTRA}:
            return "falcon_h1", "exact as FalconH1ForCausalLM (native in transformers, vLLM)"
        # Falcon-H1 can also hold A/M blocks exactly by zeroing the absent branch, but that
        # pays a whole extra mixer per layer; auto prefers the lean remote-code model.
        why = "; ".join(nemotron_h_blockers(cfg)[:1] + falcon_h1_blockers(cfg)[:1])
        target = "remote_code"
        reasons = remote_code_blockers(cfg)
        if reasons:
            native = nemotron_h_blockers(cfg) if cfg.flavour == "nemotron_h" else []
            raise NotExactError("no export target is exact for this model: " + "; ".join(native + reasons))
        return (
            target,
            "remote_code (trust_remote_code=True): no native target is exact "
            f"({why or 'mixed A/M/H blocks'})",
        )
    if target not in BLOCKERS:
        raise ValueError(f"--target: expected auto or one of {TARGETS}, got {target!r}")
    reasons = BLOCKERS[target](cfg)
    if reasons:
        exact = [t for t in TARGETS if not BLOCKERS[t](cfg)]
        hint = f"use --target {exact[0]} (or auto)" if exact else "no export target is exact"
        raise NotExactError(
            f"target {target!r} cannot represent this model exactly:\n  - "
            + "\n  - ".join(reasons)
            + f"\n{hint}"
        )
    return target, "requested"
