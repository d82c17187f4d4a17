"""Our model <-> ``FalconH1ForCausalLM`` (transformers), exact where exactness.py allows.

Every Falcon-H1 layer runs attention and Mamba2 in parallel on one input norm, sums
``o_proj(attn) + out_proj(mamba)``, then a SwiGLU FFN. Our intra block ``H`` maps onto it by
splitting the fused in-projection by rows and the out-projection by columns (concat), copying it
(add) or copying and negating it for the Mamba branch (subtract); branch scalars fold into the
out-projections. An ``A`` block becomes a layer whose Mamba out_proj is zero, an ``M`` block one
whose attention o_proj is zero (and whose FFN is zero when our Mamba blocks have none): the
zero branch contributes exactly 0.0, so the model is the same (at the cost of that branch).
"""

from __future__ import annotations

import torch

from hybrid_megatron.config.layer_pattern import ATTENTION, INTRA, MAMBA, build_layer_pattern, has_ffn
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.convert.exactness import falcon_h1_geometry
from hybrid_megatron.convert.qkv import join_qkv, split_qkv


def _dims(cfg: ModelConfig):
    """((heads, groups, head_dim), mamba d_inner) shared by every Falcon-H1 layer."""
    geo = falcon_h1_geometry(cfg)
    if "intra" in geo:
        return geo["intra"]
    return geo["attention"], cfg.mamba.expand * cfg.hidden_size


def falcon_h1_config(cfg: ModelConfig) -> dict:
    """The ``config.json`` dict (FalconH1Config fields) of the export of ``cfg``."""
    (heads, groups, head_dim), d_inner = _dims(cfg)
    return {
        "architectures": ["FalconH1ForCausalLM"],
        "model_type": "falcon_h1",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_epsilon,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        # megatron-core passes int(rotary_base) to its RotaryEmbedding
        "rope_parameters": {"rope_type": "default", "rope_theta": float(int(cfg.attention.rotary_base))},
        "mamba_d_ssm": d_inner,
        "mamba_n_heads": d_inner // cfg.mamba.head_dim,
        "mamba_d_head": cfg.mamba.head_dim,
        "mamba_n_groups": cfg.mamba.num_groups,
        "mamba_d_state": cfg.mamba.state_dim,
        "mamba_d_conv": cfg.mamba.conv_kernel,
        "mamba_expand": cfg.mamba.expand,
        "mamba_chunk_size": cfg.mamba.chunk_size,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        # megatron-core: gated RMSNorm of y * silu(z), i.e. the gate before the norm
        "mamba_rms_norm": True,
        "mamba_norm_before_gate": False,
        "projectors_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "time_step_limit": [0.0, float("inf")],
    }


def _mamba_in_width(cfg: ModelConfig, d_inner: int) -> int:
    return 2 * d_inner + 2 * cfg.mamba.num_groups * cfg.mamba.state_dim + d_inner // cfg.mamba.head_dim


def to_falcon_h1(cfg: ModelConfig, sd: dict) -> dict:
    """Our full (TP=1) state dict -> FalconH1ForCausalLM tensors (same dtype).

    Takes the ModelConfig and the model's state dict (``_extra_state`` entries ignored); call
    exactness.falcon_h1_blockers first. Returns {HF name: tensor}.
    """
    (heads, groups, head_dim), d_inner = _dims(cfg)
    hidden = cfg.hidden_size
    conv_dim = d_inner + 2 * cfg.mamba.num_groups * cfg.mamba.state_dim
    nheads = d_inner // cfg.mamba.head_dim
    ref = sd["embedding.word_embeddings.weight"]
    zeros = lambda *shape: torch.zeros(*shape, dtype=ref.dtype)  # noqa: E731
    out = {"model.embed_tokens.weight": ref}
    for i, letter in enumerate(build_layer_pattern(cfg)):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        mix = src + "self_attention."
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        attn = mamba = None  # (q, k, v, o) / (in_proj, out_proj, params prefix)
        if letter == ATTENTION:
            attn = (
                *split_qkv(sd[mix + "linear_qkv.weight"], heads, groups, head_dim),
                sd[mix + "linear_proj.weight"],
            )
        elif letter == MAMBA:
            mamba = (sd[mix + "in_proj.weight"], sd[mix + "out_proj.weight"], mix)
        else:
            qkv_rows = (heads + 2 * groups) * head_dim
            fused = sd[mix + "in_proj.weight"]
            w_out = sd[mix + "out_proj.weight"]
            a_scale = sd.get(mix + "attention_scale")
            m_scale = sd.get(mix + "mamba_scale")
            fusion = cfg.intra.fusion
            if fusion == "concat":
                o, m_out = w_out[:, : heads * head_dim], w_out[:, heads * head_dim :]
            else:
                o, m_out = w_out, (-w_out if fusion == "subtract" else w_out)
            # (s * a) W^T == a (s W)^T: the learnable branch scalars fold into the projections
            if a_scale is not None:
                o = o * a_scale
            if m_scale is not None:
                m_out = m_out * m_scale
            attn = (*split_qkv(fused[:qkv_rows], heads, groups, head_dim), o)
            mamba = (fused[qkv_rows:], m_out, mix + "mamba.")
        if attn is None:
            attn = (
                zeros(heads * head_dim, hidden),
                zeros(groups * head_dim, hidden),
                zeros(groups * head_dim, hidden),
                zeros(hidden, heads * head_dim),
            )
        for name, t in zip(("q_proj", "k_proj", "v_proj", "o_proj"), attn):
            out[f"{dst}self_attn.{name}.weight"] = t.contiguous()
        if mamba is None:
            m = dst + "mamba."
            out[m + "in_proj.weight"] = zeros(_mamba_in_width(cfg, d_inner), hidden)
            out[m + "out_proj.weight"] = zeros(hidden, d_inner)
            out[m + "conv1d.weight"] = zeros(conv_dim, 1, cfg.mamba.conv_kernel)
            out[m + "conv1d.bias"] = zeros(conv_dim)
            out[m + "A_log"] = zeros(nheads)
            out[m + "D"] = zeros(nheads)
            out[m + "dt_bias"] = zeros(nheads)
            out[m + "norm.weight"] = torch.ones(d_inner, dtype=ref.dtype)
        else:
            in_w, out_w, p = mamba
            m = dst + "mamba."
            out[m + "in_proj.weight"] = in_w.contiguous()
            out[m + "out_proj.weight"] = out_w.contiguous()
            for name in ("conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight"):
                out[m + name] = sd[p + name]
        if has_ffn(cfg, letter):
            fc1 = sd[src + "mlp.linear_fc1.weight"]
            gate, up = fc1.chunk(2, dim=0)
            out[dst + "feed_forward.gate_proj.weight"] = gate.contiguous()
            out[dst + "feed_forward.up_proj.weight"] = up.contiguous()
            out[dst + "feed_forward.down_proj.weight"] = sd[src + "mlp.linear_fc2.weight"]
            out[dst + "pre_ff_layernorm.weight"] = sd[src + "pre_mlp_layernorm.weight"]
        else:  # a zero FFN adds exactly 0.0
            out[dst + "feed_forward.gate_proj.weight"] = zeros(cfg.ffn_size, hidden)
            out[dst + "feed_forward.up_proj.weight"] = zeros(cfg.ffn_size, hidden)
            out[dst + "feed_forward.down_proj.weight"] = zeros(hidden, cfg.ffn_size)
            out[dst + "pre_ff_layernorm.weight"] = torch.ones(hidden, dtype=ref.dtype)
    out["model.final_layernorm.weight"] = sd["decoder.final_layernorm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"]
    return out


def model_config_from_falcon_h1(hf: dict) -> dict:
    """A FalconH1 ``config.json`` dict -> our ``model:`` recipe dict (kind intra, all H, concat).

    Refuses (ValueError) Falcon-H1 features our intra block does not have: muP multipliers
    other than 1, biases, norm-after-gate, an ungated Mamba, parameters with another meaning.
    """
    problems = []
    for key in (
        "embedding_multiplier",
        "lm_head_multiplier",
        "key_multiplier",
        "attention_in_multiplier",
        "attention_out_multiplier",
        "ssm_in_multiplier",
        "ssm_out_multiplier",
    ):
        if float(hf.get(key, 1.0)) != 1.0:
            problems.append(f"{key}={hf[key]}")
    for key in ("mlp_multipliers", "ssm_multipliers"):
        if any(float(v) != 1.0 for v in hf.get(key) or []):
            problems.append(f"{key}={hf[key]}")
    for key in ("projectors_bias", "mamba_proj_bias", "attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true")
    if not hf.get("mamba_conv_bias", True):
        problems.append("mamba_conv_bias=false")
    if not hf.get("mamba_rms_norm", False) or hf.get("mamba_norm_before_gate", True):
        problems.append("Mamba gated norm must be mamba_rms_norm=true, mamba_norm_before_gate=false")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']}")
    if problems:
        raise ValueError("Falcon-H1 checkpoint not representable by our intra block: " + ", ".join(problems))
    hidden = hf["hidden_size"]
    heads, groups = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    d_ssm = hf.get("mamba_d_ssm") or hf["mamba_expand"] * hidden
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return {
        "kind": "intra",
        "impl": "local",
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hidden,
        "ffn_hidden_size": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf.get("max_position_embeddings", 4096),
        "attention": {
            "num_heads": heads,
            "num_query_groups": groups,
            "head_dim": head_dim,
            "rotary_base": float(theta),
        },
        "mamba": {
            "state_dim": hf["mamba_d_state"],
            "head_dim": d_ssm // hf["mamba_n_heads"],
            "num_groups": hf["mamba_n_groups"],
            "expand": hf.get("mamba_expand", 2),
            "conv_kernel": hf["mamba_d_conv"],
            "chunk_size": hf.get("mamba_chunk_size", 128),
        },
        "pattern": {"layout": INTRA * hf["num_hidden_layers"]},
        "intra": {
            "dim_ratio": f"{heads * head_dim}:{d_ssm}",
            "mixer_width": heads * head_dim + d_ssm,
            "num_query_groups": groups,
            "branch_norm": "none",
            "branch_scalars": False,
            "fusion": "concat",
        },
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-5)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def from_falcon_h1(cfg: ModelConfig, hf_sd: dict) -> dict:
    """FalconH1 tensors -> our state dict for ``cfg`` (from model_config_from_falcon_h1).

    Concat fusion: our out_proj is [o_proj | mamba.out_proj] by columns. Returns {name: tensor}.
    """
    (heads, groups, head_dim), _ = _dims(cfg)
    sd = {"embedding.word_embeddings.weight": hf_sd["model.embed_tokens.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        mix = dst + "self_attention."
        sd[dst + "input_layernorm.weight"] = hf_sd[src + "input_layernorm.weight"]
        q, k, v = (hf_sd[f"{src}self_attn.{n}_proj.weight"] for n in "qkv")
        qkv = join_qkv(q, k, v, heads, groups, head_dim)
        sd[mix + "in_proj.weight"] = torch.cat([qkv, hf_sd[src + "mamba.in_proj.weight"]], dim=0)
        sd[mix + "out_proj.weight"] = torch.cat(
            [hf_sd[src + "self_attn.o_proj.weight"], hf_sd[src + "mamba.out_proj.weight"]], dim=1
        )
        for name in ("conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight"):
            sd[mix + "mamba." + name] = hf_sd[src + "mamba." + name]
        sd[dst + "pre_mlp_layernorm.weight"] = hf_sd[src + "pre_ff_layernorm.weight"]
        sd[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf_sd[src + "feed_forward.gate_proj.weight"], hf_sd[src + "feed_forward.up_proj.weight"]], dim=0
        )
        sd[dst + "mlp.linear_fc2.weight"] = hf_sd[src + "feed_forward.down_proj.weight"]
    sd["decoder.final_layernorm.weight"] = hf_sd["model.final_layernorm.weight"]
    if not cfg.tie_embeddings:
        sd["output_layer.weight"] = hf_sd["lm_head.weight"]
    return sd
