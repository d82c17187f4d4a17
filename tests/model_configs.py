"""Tiny model configs of every kind, shared by the model tests."""

from __future__ import annotations

import copy

KINDS = ["transformer", "swa", "mamba", "inter", "intra"]


def tiny_model(kind: str, moe: bool = False, **overrides) -> dict:
    """A few-layer model of ``kind`` small enough for multi-rank CPU tests (as a recipe dict)."""
    cfg = {
        "kind": kind,
        "impl": "local",
        "num_layers": 4,
        "hidden_size": 64,
        "ffn_hidden_size": 128,
        "vocab_size": 96,
        "max_position_embeddings": 64,
        "mamba": {"state_dim": 8, "head_dim": 16, "num_groups": 2, "chunk_size": 8},
    }
    if kind != "mamba":
        cfg["attention"] = {"num_heads": 4, "num_query_groups": 2}
    if kind == "swa":
        cfg["attention"]["sliding_window"] = 6
    if kind == "inter":
        cfg["pattern"] = {"ratio": "1:1"}
    if kind == "intra":
        cfg["intra"] = {"num_query_groups": 2}
        cfg["pattern"] = {"ratio": "3:1"}
    if moe:
        cfg["moe"] = {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 64}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return copy.deepcopy(cfg)


def wide_model(kind: str = "inter", layout: str = "MAMMAM", **overrides):
    """A 1B-wide hybrid (32 heads, 8 KV groups, 64 Mamba heads of 64, 8 B/C groups) with the
    given blocks, as a ModelConfig (for the planner's models: nothing is built)."""
    from hybrid_megatron.config.model import ModelConfig

    fields = dict(
        kind=kind,
        num_layers=len(layout),
        hidden_size=2048,
        ffn_hidden_size=8192,
        vocab_size=128256,
        attention={"num_heads": 32, "num_query_groups": 8},
        pattern={"layout": layout, "allow_early_attention": True},
        mamba={"num_groups": 8},
    )
    fields.update(overrides)
    return ModelConfig(**fields)
