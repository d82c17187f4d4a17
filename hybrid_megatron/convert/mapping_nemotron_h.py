"""Our model <-> ``NemotronHForCausalLM`` (transformers).

NemotronH layers are RMSNorm + one mixer + residual. Exact today (see exactness.py) for a stack
of FFN-free Mamba2 blocks (kind mamba, ``mamba_block_ffn: false``): the Mamba2 mixer's weights
map one to one (in_proj rows [z, x, B, C, dt], conv1d over [x, B, C], A_log, D, dt_bias, gated
norm of y * silu(z) per group, out_proj).
"""

from __future__ import annotations

from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.models.layer_pattern import build_layer_pattern

_MAMBA_PARAMS = ("in_proj.weight", "out_proj.weight", "conv1d.weight", "conv1d.bias", "A_log",
                 "D", "dt_bias", "norm.weight")


def nemotron_h_config(cfg: ModelConfig) -> dict:
    """The ``config.json`` dict (NemotronHConfig fields) of the export of ``cfg``."""
    d_inner = cfg.mamba.expand * cfg.hidden_size
    types = {"M": "mamba"}
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "layers_block_type": [types[c] for c in build_layer_pattern(cfg)],
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "ssm_state_size": cfg.mamba.state_dim,
        "mamba_num_heads": d_inner // cfg.mamba.head_dim,
        "mamba_head_dim": cfg.mamba.head_dim,
        "n_groups": cfg.mamba.num_groups,
        "conv_kernel": cfg.mamba.conv_kernel,
        "expand": cfg.mamba.expand,
        "chunk_size": cfg.mamba.chunk_size,
        "use_conv_bias": True,
        "mamba_proj_bias": False,
        "mamba_hidden_act": "silu",
        "time_step_limit": [0.0, float("inf")],
        "layer_norm_epsilon": cfg.norm_epsilon,
        "residual_in_fp32": False,
        "use_bias": False,
    }


def to_nemotron_h(cfg: ModelConfig, sd: dict) -> dict:
    """Our full (TP=1) state dict -> NemotronHForCausalLM tensors; check exactness first."""
    out = {"model.embeddings.weight": sd["embedding.word_embeddings.weight"]}
    for i, letter in enumerate(build_layer_pattern(cfg)):
        assert letter == "M", "exactness.nemotron_h_blockers admits Mamba blocks only"
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "norm.weight"] = sd[src + "input_layernorm.weight"]
        for name in _MAMBA_PARAMS:
            out[dst + "mixer." + name] = sd[src + "self_attention." + name]
    out["model.norm_f.weight"] = sd["decoder.final_layernorm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"]
    return out


def model_config_from_nemotron_h(hf: dict) -> dict:
    """A NemotronH ``config.json`` dict -> our ``model:`` recipe dict (kind mamba, no FFN).

    Raises ValueError when the checkpoint has layers other than Mamba2 (attention without RoPE,
    relu2 MLP, sigmoid MoE have no counterpart in our model yet) or biases.
    """
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types is None and "hybrid_override_pattern" in hf:
        types = ["mamba" if c == "M" else c for c in hf["hybrid_override_pattern"]]
    other = sorted({t for t in types if t not in ("mamba", "linear_attention")})
    problems = []
    if other:
        problems.append(f"layer types {other} (only Mamba2 layers have an exact counterpart)")
    if hf.get("mamba_proj_bias") or hf.get("use_bias"):
        problems.append("biases")
    if not hf.get("use_conv_bias", True):
        problems.append("use_conv_bias=false")
    if float(hf.get("layer_norm_epsilon", 1e-5)) != 1e-5:
        problems.append("layer_norm_epsilon must be 1e-5 (our Mamba gated norm eps)")
    if hf.get("mamba_hidden_act", "silu") != "silu":
        problems.append(f"mamba_hidden_act={hf['mamba_hidden_act']}")
    if problems:
        raise ValueError("NemotronH checkpoint not representable by our model: " + "; ".join(problems))
    hidden = hf["hidden_size"]
    d_inner = hf["mamba_num_heads"] * hf["mamba_head_dim"]
    if d_inner % hidden:
        raise ValueError(f"NemotronH d_inner {d_inner} is not a multiple of hidden_size {hidden}")
    return {
        "kind": "mamba",
        "impl": "local",
        "num_layers": len(types),
        "hidden_size": hidden,
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf.get("max_position_embeddings", 4096),
        "mamba": {"state_dim": hf["ssm_state_size"], "head_dim": hf["mamba_head_dim"],
                  "num_groups": hf["n_groups"], "expand": d_inner // hidden,
                  "conv_kernel": hf.get("conv_kernel", 4), "chunk_size": hf.get("chunk_size", 128)},
        "mamba_block_ffn": False,
        "norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def from_nemotron_h(cfg: ModelConfig, hf_sd: dict) -> dict:
    """NemotronH tensors -> our state dict for ``cfg`` (from model_config_from_nemotron_h)."""
    sd = {"embedding.word_embeddings.weight": hf_sd["model.embeddings.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        sd[dst + "input_layernorm.weight"] = hf_sd[src + "norm.weight"]
        for name in _MAMBA_PARAMS:
            sd[dst + "self_attention." + name] = hf_sd[src + "mixer." + name]
    sd["decoder.final_layernorm.weight"] = hf_sd["model.norm_f.weight"]
    if not cfg.tie_embeddings:
        sd["output_layer.weight"] = hf_sd["lm_head.weight"]
    return sd
