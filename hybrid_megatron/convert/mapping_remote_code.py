"""Our model -> the self-contained remote-code export (``remote_code/`` templates).

The remote-code model names its parameters exactly like the megatron-core model, so the
weights are copied unchanged; this module writes the config fields that rebuild the network.
"""

from __future__ import annotations

from pathlib import Path

from hybrid_megatron.config.geometry import intra_branch_widths
from hybrid_megatron.config.layer_pattern import INTRA, build_layer_pattern
from hybrid_megatron.config.model import ModelConfig

TEMPLATE_DIR = Path(__file__).parent / "remote_code"
TEMPLATE_FILES = ("configuration_hybrid_megatron.py", "modeling_hybrid_megatron.py")


def remote_code_config(cfg: ModelConfig) -> dict:
    """The ``config.json`` dict (HybridMegatronConfig fields + auto_map) for ``cfg``."""
    pattern = build_layer_pattern(cfg)
    out = {
        "architectures": ["HybridMegatronForCausalLM"],
        "model_type": "hybrid_megatron",
        "auto_map": {
            "AutoConfig": "configuration_hybrid_megatron.HybridMegatronConfig",
            "AutoModelForCausalLM": "modeling_hybrid_megatron.HybridMegatronForCausalLM",
        },
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "layer_pattern": pattern,
        "num_hidden_layers": len(pattern),
        "ffn_hidden_size": cfg.ffn_size,
        "mamba_block_ffn": cfg.mamba_block_ffn,
        "norm_epsilon": cfg.norm_epsilon,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "mamba_state_dim": cfg.mamba.state_dim,
        "mamba_head_dim": cfg.mamba.head_dim,
        "mamba_num_groups": cfg.mamba.num_groups,
        "mamba_d_inner": cfg.mamba.expand * cfg.hidden_size,
        "mamba_conv_kernel": cfg.mamba.conv_kernel,
        "mamba_chunk_size": cfg.mamba.chunk_size,
        # our Mamba mixers' gated norm follows norm_epsilon (models/mamba.py)
        "mamba_norm_epsilon": cfg.norm_epsilon,
    }
    if cfg.attention is not None:
        out.update(
            num_attention_heads=cfg.attention.num_heads,
            num_query_groups=cfg.query_groups,
            head_dim=cfg.head_dim,
            sliding_window=cfg.attention.sliding_window,
            rotary_base=int(cfg.attention.rotary_base),
        )
    if INTRA in pattern:
        aw, mw = intra_branch_widths(cfg)
        out.update(
            intra_attention_width=aw,
            intra_mamba_width=mw,
            intra_num_query_groups=cfg.intra.num_query_groups,
            intra_branch_norm=cfg.intra.branch_norm,
            intra_branch_scalars=cfg.intra.branch_scalars,
            intra_fusion=cfg.intra.fusion,
        )
    if cfg.moe is not None:
        out.update(
            moe_num_experts=cfg.moe.num_experts,
            moe_top_k=cfg.moe.top_k,
            moe_ffn_hidden_size=cfg.moe.expert_ffn_hidden_size or cfg.ffn_size,
            moe_shared_expert_ffn_hidden_size=cfg.moe.shared_expert_ffn_hidden_size,
            # as in transformer_config.build_transformer_config
            moe_pre_softmax=cfg.moe.top_k == 1,
        )
    return out


def to_remote_code(cfg: ModelConfig, sd: dict) -> dict:
    """Our full state dict -> the export's tensors (the same names, extra states dropped)."""
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state") and v is not None}
