"""Our model <-> ``NemotronHForCausalLM`` (transformers).

NemotronH layers are RMSNorm + one mixer + residual: ``mamba`` (Mamba2), ``attention`` (GQA, no
position embedding), ``mlp`` (up, relu2, down) or ``moe`` (sigmoid router with a score-correction
bias, non-gated relu2 experts, one shared expert). Each of our blocks is one or two of them: its
mixer sublayer (input norm + mixer) and its FFN sublayer (pre-FFN norm + MLP or MoE), in that
order; the single-sublayer letters ``*``, ``-``, ``E`` are one each. Exact (exactness.py) for
flavour nemotron_h models without sliding windows, and for FFN-free Mamba2 stacks of either
flavour. Tensors map one to one except:

- attention: megatron's grouped fused QKV rows <-> q_proj, k_proj, v_proj (convert/qkv.py);
- MoE experts: ``local_experts.<e>.linear_fc1/2`` <-> the stacked ``experts.up_proj`` [E, I, h]
  and ``experts.down_proj`` [E, h, I]; no expert bias (``moe.expert_bias: false``) exports as a
  zero ``e_score_correction_bias``, no shared expert as a zero one of width 1 (both add exactly
  0) with ``n_shared_experts: 0`` recorded;
- ``lm_head.weight`` is always written (NemotronHForCausalLM never ties it; a tied model writes
  a copy of the embedding).

Files use NemotronH's checkpoint names, as NVIDIA's checkpoints and transformers'
``save_pretrained`` write them (and vLLM reads them): ``backbone.`` prefix, one
``experts.<e>.up_proj.weight`` / ``down_proj.weight`` per expert. transformers renames them on
load to its module names (``model.``, stacked ``experts.up_proj``), which the mapping below uses.

``config.json`` also records our block layout under ``hybrid_megatron`` so that from-hf rebuilds
the same blocks (an ``A`` block rather than a ``*`` and a ``-`` layer); other NemotronH
checkpoints map layer for layer onto single-sublayer letters.
"""

from __future__ import annotations

import re

import torch

from hybrid_megatron.config.layer_pattern import (
    ATTENTION,
    ATTENTION_LETTERS,
    ATTENTION_ONLY,
    FFN_ONLY_LETTERS,
    MAMBA,
    MLP_ONLY,
    MOE_ONLY,
    build_layer_pattern,
    ffn_is_moe,
    has_ffn,
    has_mixer,
)
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.convert.qkv import join_qkv, split_qkv

_MAMBA_PARAMS = (
    "in_proj.weight",
    "out_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "A_log",
    "D",
    "dt_bias",
    "norm.weight",
)
# NemotronH layer types (the names older and newer transformers both read) and their letters.
_TYPE_LETTER = {"mamba": MAMBA, "attention": ATTENTION_ONLY, "mlp": MLP_ONLY, "moe": MOE_ONLY}
_LEGACY_TYPES = {"linear_attention": "mamba", "full_attention": "attention"}
HINT_KEY = "hybrid_megatron"  # config.json entry holding our block layout


def hf_layers(cfg: ModelConfig) -> list[tuple[int, str, str]]:
    """The NemotronH layers of ``cfg``, in order.

    Takes the ModelConfig; returns ``(our layer index, sublayer, NemotronH type)`` triples with
    sublayer ``mixer`` (our input norm + mixer) or ``ffn`` (pre-FFN norm + MLP/MoE).
    """
    out = []
    for i, letter in enumerate(build_layer_pattern(cfg)):
        if has_mixer(letter):
            out.append((i, "mixer", "attention" if letter in ATTENTION_LETTERS else "mamba"))
        if has_ffn(cfg, letter):
            out.append((i, "ffn", "moe" if ffn_is_moe(cfg, letter) else "mlp"))
    return out


def nemotron_h_config(cfg: ModelConfig) -> dict:
    """The ``config.json`` dict (NemotronHConfig fields) of the export of ``cfg``."""
    d_inner = cfg.mamba.expand * cfg.hidden_size
    types = [t for _, _, t in hf_layers(cfg)]
    out = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "layers_block_type": types,
        "hybrid_override_pattern": "".join(_TYPE_LETTER[t] for t in types),
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
        # transformers clamps dt from below at time_step_min, megatron-core's Mamba2 does not;
        # 0 would break transformers' dt init (its log), so: the smallest normal float, which
        # softplus(dt) undercuts only when it underflows
        "time_step_min": float(torch.finfo(torch.float32).tiny),
        "time_step_limit": [0.0, float("inf")],
        "layer_norm_epsilon": cfg.norm_epsilon,
        "residual_in_fp32": False,
        "use_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "mlp_hidden_act": "relu2",
        "intermediate_size": cfg.ffn_size,
        "sliding_window": None,
        "num_nextn_predict_layers": 0,
        HINT_KEY: {"layout": build_layer_pattern(cfg), "mamba_block_ffn": cfg.mamba_block_ffn},
    }
    if cfg.attention is not None:
        out.update(
            num_attention_heads=cfg.attention.num_heads,
            num_key_value_heads=cfg.query_groups,
            head_dim=cfg.head_dim,
        )
    if "moe" in types:
        moe = cfg.moe
        shared = moe.shared_expert_ffn_hidden_size
        out.update(
            n_routed_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            moe_intermediate_size=moe.expert_ffn_hidden_size or cfg.ffn_size,
            n_shared_experts=1 if shared else 0,
            moe_shared_expert_intermediate_size=shared or 1,
            moe_latent_size=None,
            # megatron-core renormalises the chosen sigmoid scores exactly when top_k > 1
            norm_topk_prob=moe.top_k > 1,
            routed_scaling_factor=moe.topk_scaling_factor or 1.0,
            n_group=1,
            topk_group=1,
        )
    return out


def _attention_to_hf(cfg: ModelConfig, sd: dict, src: str) -> dict:
    q, k, v = split_qkv(
        sd[src + "linear_qkv.weight"], cfg.attention.num_heads, cfg.query_groups, cfg.head_dim
    )
    return {
        "q_proj.weight": q,
        "k_proj.weight": k,
        "v_proj.weight": v,
        "o_proj.weight": sd[src + "linear_proj.weight"],
    }


def _attention_from_hf(cfg: ModelConfig, hf: dict, src: str) -> dict:
    q, k, v = (hf[f"{src}{n}_proj.weight"] for n in "qkv")
    qkv = join_qkv(q, k, v, cfg.attention.num_heads, cfg.query_groups, cfg.head_dim)
    return {"linear_qkv.weight": qkv, "linear_proj.weight": hf[src + "o_proj.weight"]}


def _moe_to_hf(cfg: ModelConfig, sd: dict, src: str) -> dict:
    moe, h = cfg.moe, cfg.hidden_size
    experts = range(moe.num_experts)
    fc = lambda e, n: sd[f"{src}experts.local_experts.{e}.linear_fc{n}.weight"]  # noqa: E731
    out = {
        "gate.weight": sd[src + "router.weight"],
        "gate.e_score_correction_bias": sd.get(
            src + "router.expert_bias", torch.zeros(moe.num_experts, dtype=torch.float32)
        ),
        "experts.up_proj": torch.stack([fc(e, 1) for e in experts]),
        "experts.down_proj": torch.stack([fc(e, 2) for e in experts]),
    }
    if moe.shared_expert_ffn_hidden_size:
        out["shared_experts.up_proj.weight"] = sd[src + "shared_experts.linear_fc1.weight"]
        out["shared_experts.down_proj.weight"] = sd[src + "shared_experts.linear_fc2.weight"]
    else:  # NemotronH always has a shared expert: a zero one adds exactly 0
        ref = sd[src + "router.weight"]
        out["shared_experts.up_proj.weight"] = torch.zeros(1, h, dtype=ref.dtype)
        out["shared_experts.down_proj.weight"] = torch.zeros(h, 1, dtype=ref.dtype)
    return out


def _moe_from_hf(cfg: ModelConfig, hf: dict, src: str) -> dict:
    out = {"router.weight": hf[src + "gate.weight"]}
    if cfg.moe_expert_bias:
        out["router.expert_bias"] = hf[src + "gate.e_score_correction_bias"].float()
    for e in range(cfg.moe.num_experts):
        out[f"experts.local_experts.{e}.linear_fc1.weight"] = hf[src + "experts.up_proj"][e]
        out[f"experts.local_experts.{e}.linear_fc2.weight"] = hf[src + "experts.down_proj"][e]
    if cfg.moe.shared_expert_ffn_hidden_size:
        out["shared_experts.linear_fc1.weight"] = hf[src + "shared_experts.up_proj.weight"]
        out["shared_experts.linear_fc2.weight"] = hf[src + "shared_experts.down_proj.weight"]
    return out


def _layer_to_hf(cfg: ModelConfig, sd: dict, i: int, part: str, kind: str) -> dict:
    """One NemotronH layer's tensors (names below ``model.layers.<j>.``) from our layer i."""
    src = f"decoder.layers.{i}."
    if part == "mixer":
        out = {"norm.weight": sd[src + "input_layernorm.weight"]}
        mix = src + "self_attention."
        if kind == "mamba":
            mixer = {name: sd[mix + name] for name in _MAMBA_PARAMS}
        else:
            mixer = _attention_to_hf(cfg, sd, mix)
    else:
        out = {"norm.weight": sd[src + "pre_mlp_layernorm.weight"]}
        mlp = src + "mlp."
        if kind == "mlp":
            mixer = {
                "up_proj.weight": sd[mlp + "linear_fc1.weight"],
                "down_proj.weight": sd[mlp + "linear_fc2.weight"],
            }
        else:
            mixer = _moe_to_hf(cfg, sd, mlp)
    out.update({"mixer." + k: v for k, v in mixer.items()})
    return out


def _layer_from_hf(cfg: ModelConfig, hf: dict, j: int, i: int, part: str, kind: str) -> dict:
    """Inverse of _layer_to_hf: NemotronH layer j -> our tensors (full names) of layer i."""
    src, dst = f"model.layers.{j}.", f"decoder.layers.{i}."
    mix = src + "mixer."
    if part == "mixer":
        out = {dst + "input_layernorm.weight": hf[src + "norm.weight"]}
        if kind == "mamba":
            ours = {name: hf[mix + name] for name in _MAMBA_PARAMS}
        else:
            ours = _attention_from_hf(cfg, hf, mix)
        out.update({dst + "self_attention." + k: v for k, v in ours.items()})
    else:
        out = {dst + "pre_mlp_layernorm.weight": hf[src + "norm.weight"]}
        if kind == "mlp":
            ours = {
                "linear_fc1.weight": hf[mix + "up_proj.weight"],
                "linear_fc2.weight": hf[mix + "down_proj.weight"],
            }
        else:
            ours = _moe_from_hf(cfg, hf, mix)
        out.update({dst + "mlp." + k: v for k, v in ours.items()})
    return out


def to_nemotron_h(cfg: ModelConfig, sd: dict) -> dict:
    """Our full (TP=1) state dict -> NemotronHForCausalLM tensors; check exactness first.

    Takes the ModelConfig and the model's state dict (``_extra_state`` entries ignored); returns
    {HF name: tensor}.
    """
    out = {"model.embeddings.weight": sd["embedding.word_embeddings.weight"]}
    for j, (i, part, kind) in enumerate(hf_layers(cfg)):
        for name, t in _layer_to_hf(cfg, sd, i, part, kind).items():
            out[f"model.layers.{j}.{name}"] = t
    out["model.norm_f.weight"] = sd["decoder.final_layernorm.weight"]
    out["lm_head.weight"] = sd[
        "embedding.word_embeddings.weight" if cfg.tie_embeddings else "output_layer.weight"
    ]
    return checkpoint_names(out)


_STACKED = re.compile(r"^(.*\.mixer\.experts)\.(up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


def checkpoint_names(tensors: dict) -> dict:
    """transformers' module names -> NemotronH checkpoint names (``model.`` -> ``backbone.``,
    stacked expert weights -> one tensor per expert)."""
    out = {}
    for name, t in tensors.items():
        if name.startswith("model."):
            name = "backbone." + name[len("model.") :]
        m = _STACKED.match(name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e]
        else:
            out[name] = t
    return out


def _hf_letters(hf: dict) -> str:
    """The checkpoint's layer types as letters (M mamba, * attention, - mlp, E moe)."""
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types is None and "hybrid_override_pattern" in hf:
        return hf["hybrid_override_pattern"]
    if types is None:
        raise ValueError("NemotronH config: no layers_block_type or hybrid_override_pattern")
    unknown = sorted({t for t in types if _LEGACY_TYPES.get(t, t) not in _TYPE_LETTER})
    if unknown:
        raise ValueError(f"NemotronH checkpoint has layer types {unknown} we do not have")
    return "".join(_TYPE_LETTER[_LEGACY_TYPES.get(t, t)] for t in types)


def _expand(layout: str, mamba_block_ffn: bool, moe: bool) -> str:
    """Our block layout -> NemotronH layer letters (what hf_layers gives, as letters)."""
    ffn = MOE_ONLY if moe else MLP_ONLY
    out = []
    for c in layout:
        out.append(
            {ATTENTION: ATTENTION_ONLY + ffn, MAMBA: MAMBA + (ffn if mamba_block_ffn else "")}.get(c, c)
        )
    return "".join(out)


def model_config_from_nemotron_h(hf: dict, tensors: dict | None = None) -> dict:
    """A NemotronH ``config.json`` dict -> our ``model:`` recipe dict (flavour nemotron_h).

    Takes the config and optionally the checkpoint's tensors (to tell whether a
    ``tie_word_embeddings`` checkpoint's lm_head really equals its embedding). The layout is the
    one recorded by our own export when it matches the layers, else one letter per NemotronH
    layer (``M`` with ``mamba_block_ffn: false``, ``*``, ``-``, ``E``). Raises ValueError naming
    every feature our model does not have (biases, latent MoE, group-limited routing, ...).

    One known difference is accepted: transformers clamps Mamba2's dt from below at
    ``time_step_min`` when it processes a whole sequence (not when decoding token by token);
    megatron-core never clamps. Trained models' dt is far above the 1e-3 default.
    """
    letters = _hf_letters(hf)
    problems = []
    for key in ("mamba_proj_bias", "use_bias", "attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true")
    if not hf.get("use_conv_bias", True):
        problems.append("use_conv_bias=false")
    if hf.get("mamba_hidden_act", "silu") != "silu":
        problems.append(f"mamba_hidden_act={hf['mamba_hidden_act']}")
    if any(c in letters for c in FFN_ONLY_LETTERS) and hf.get("mlp_hidden_act", "relu2") != "relu2":
        problems.append(f"mlp_hidden_act={hf['mlp_hidden_act']} (ours is relu2)")
    if ATTENTION_ONLY in letters and hf.get("sliding_window"):
        problems.append("sliding_window")
    moe = MOE_ONLY in letters
    if moe:
        top_k = hf.get("num_experts_per_tok", 2)
        if hf.get("moe_latent_size") is not None:
            problems.append("moe_latent_size (latent MoE projections)")
        if hf.get("topk_group", 1) < hf.get("n_group", 1):
            problems.append("topk_group < n_group (group-limited routing)")
        if bool(hf.get("norm_topk_prob", True)) != (top_k > 1):
            problems.append(
                f"norm_topk_prob={hf.get('norm_topk_prob', True)} with num_experts_per_tok={top_k} "
                f"(ours renormalises exactly when top_k > 1)"
            )
    if problems:
        raise ValueError("NemotronH checkpoint not representable by our model: " + "; ".join(problems))

    hint = hf.get(HINT_KEY) or {}
    if hint and _expand(hint.get("layout", ""), hint.get("mamba_block_ffn", True), moe) == letters:
        layout, block_ffn = hint["layout"], bool(hint["mamba_block_ffn"])
    else:
        layout, block_ffn = letters, False
    attention = any(c in layout for c in ATTENTION_LETTERS)
    kind = "inter" if attention and MAMBA in layout else ("transformer" if attention else "mamba")
    hidden = hf["hidden_size"]
    d_inner = hf["mamba_num_heads"] * hf["mamba_head_dim"]
    if MAMBA in layout and d_inner % hidden:
        raise ValueError(f"NemotronH d_inner {d_inner} is not a multiple of hidden_size {hidden}")
    tensors = normalise_names(tensors) if tensors is not None else None
    tie = bool(hf.get("tie_word_embeddings", False))
    if tie and tensors is not None and "lm_head.weight" in tensors:
        tie = torch.equal(tensors["lm_head.weight"], tensors["model.embeddings.weight"])
    out = {
        "kind": kind,
        "flavour": "nemotron_h",
        "impl": "local",
        "num_layers": len(layout),
        "hidden_size": hidden,
        "ffn_hidden_size": hf.get("intermediate_size") or 4 * hidden,
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf.get("max_position_embeddings", 4096),
        "mamba": {
            "state_dim": hf["ssm_state_size"],
            "head_dim": hf["mamba_head_dim"],
            "num_groups": hf["n_groups"],
            "expand": max(1, d_inner // hidden),
            "conv_kernel": hf.get("conv_kernel", 4),
            "chunk_size": hf.get("chunk_size", 128),
        },
        "mamba_block_ffn": block_ffn,
        "norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": tie,
    }
    default = {"inter": None, "transformer": ATTENTION * len(layout), "mamba": MAMBA * len(layout)}[kind]
    if layout != default:
        out["pattern"] = {"layout": layout, "allow_early_attention": True}
    if attention:
        out["attention"] = {
            "num_heads": hf["num_attention_heads"],
            "num_query_groups": hf.get("num_key_value_heads") or hf["num_attention_heads"],
            "head_dim": hf.get("head_dim") or hidden // hf["num_attention_heads"],
        }
    if moe:
        scale = float(hf.get("routed_scaling_factor", 1.0))
        out["moe"] = {
            "num_experts": hf["n_routed_experts"],
            "top_k": hf.get("num_experts_per_tok", 2),
            "expert_ffn_hidden_size": hf["moe_intermediate_size"],
            "shared_expert_ffn_hidden_size": (
                None if _no_shared_expert(hf, tensors) else hf["moe_shared_expert_intermediate_size"]
            ),
            "topk_scaling_factor": None if scale == 1.0 else scale,
        }
    return out


def normalise_names(hf_sd: dict) -> dict:
    """NemotronH tensors under transformers' module names, from either naming (checkpoint
    names: ``backbone.`` prefix, per-expert weights, as checkpoint_names writes; or module
    names); the multi-token-prediction tensors (``mtp.``, unused by the causal LM) left out."""
    out: dict = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in hf_sd.items():
        if name.startswith("mtp."):
            continue
        if name.startswith("backbone."):
            name = "model." + name[len("backbone.") :]
        m = _PER_EXPERT.match(name)
        if m:
            experts.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = t
        else:
            out[name] = t
    for name, parts in experts.items():
        out[name] = torch.stack([parts[e] for e in range(len(parts))])
    return out


def _no_shared_expert(hf: dict, tensors: dict | None) -> bool:
    """Whether the MoE layers' shared expert is absent: our export's ``n_shared_experts: 0``
    with all-zero weights (transformers builds and runs it whatever n_shared_experts says)."""
    if hf.get("n_shared_experts", 1) or tensors is None:
        return False
    return all(not t.any() for k, t in tensors.items() if ".shared_experts." in k)


class _Reads(dict):
    """A dict that records which keys were read (to find tensors no parameter took)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def from_nemotron_h(cfg: ModelConfig, hf_sd: dict) -> dict:
    """NemotronH tensors -> our state dict for ``cfg`` (from model_config_from_nemotron_h).

    Reads names with either the ``model.`` or the older ``backbone.`` prefix; multi-token
    prediction tensors (``mtp.``) are left out. Raises ValueError naming checkpoint tensors that
    no parameter of ``cfg`` takes (a layout mismatch would otherwise drop weights silently);
    an absent shared expert's zero weights are the exception.
    """
    hf_sd = _Reads(normalise_names(hf_sd))
    sd = {"embedding.word_embeddings.weight": hf_sd["model.embeddings.weight"]}
    for j, (i, part, kind) in enumerate(hf_layers(cfg)):
        sd.update(_layer_from_hf(cfg, hf_sd, j, i, part, kind))
    sd["decoder.final_layernorm.weight"] = hf_sd["model.norm_f.weight"]
    if "lm_head.weight" in hf_sd:
        lm_head = hf_sd["lm_head.weight"]
        if not cfg.tie_embeddings:
            sd["output_layer.weight"] = lm_head
    elif not cfg.tie_embeddings:
        sd["output_layer.weight"] = hf_sd["model.embeddings.weight"]
    left = sorted(
        k
        for k in set(hf_sd) - hf_sd.read
        if not (".shared_experts." in k and cfg.moe is not None and not cfg.moe.shared_expert_ffn_hidden_size)
    )
    if left:
        raise ValueError(f"NemotronH tensors not taken by the converted model: {left[:5]}")
    return sd
