"""Checkpoint conversion to Hugging Face layouts, verified by logits parity (issue 6).

Every parity test builds a tiny model, randomises all weights (norms, A_log, D, dt_bias and
branch scalars included), exports it in fp32, loads the export with transformers (pinned:
see PINNED_TRANSFORMERS) and checks max |logits diff| < 1e-4 on a random batch plus 32 greedy
tokens: ours recomputes the whole prefix each step, transformers' ``generate`` uses its caches.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.convert import NotExactError, choose_target, export_model, from_hf
from tests.conftest import build_single
from tests.convert_helpers import (
    full_state,
    hf_greedy,
    hf_logits,
    load_hf,
    our_greedy,
    our_logits,
    perturb,
)
from tests.model_configs import KINDS, tiny_model

transformers = pytest.importorskip("transformers")
PINNED_TRANSFORMERS = "5.23.0"
TOL = 1e-4
NEW_TOKENS = 32


def test_transformers_version_is_pinned():
    """The parity facts were read off this transformers version."""
    assert transformers.__version__ == PINNED_TRANSFORMERS


def _tokens(batch=2, seq=20, vocab=96, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _export(tmp_path, cfg_dict, target, seed=0, **kw):
    model = build_single(cfg_dict, seed=seed + 1)
    perturb(model, seed)
    model.eval()
    path, chosen, _ = export_model(
        ModelConfig(**cfg_dict), full_state(model), tmp_path / f"export-{target}", target, "fp32",
        progress=False, **kw,
    )
    return model, path, chosen


def _check_parity(model, path, generate_with_cache=True):
    hf = load_hf(path)
    tokens = _tokens()
    diff = (our_logits(model, tokens) - hf_logits(hf, tokens)).abs().max().item()
    assert diff < TOL, f"max |logits diff| {diff}"
    prompt = tokens[:, :5]
    ours = our_greedy(model, prompt, NEW_TOKENS)
    if generate_with_cache:
        theirs = hf_greedy(hf, prompt, NEW_TOKENS)
    else:
        with torch.no_grad():
            theirs = hf.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, use_cache=False, pad_token_id=0, eos_token_id=None,
                                 attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, theirs), f"greedy continuations differ:\n{ours}\n{theirs}"
    return diff


# ---------------------------------------------------------------- remote_code: every kind


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("kind", KINDS)
def test_remote_code_parity(single_rank, tmp_path, kind, moe):
    model, path, _ = _export(tmp_path, tiny_model(kind, moe=moe), "remote_code")
    assert (path / "modeling_hybrid_megatron.py").exists()
    assert json.loads((path / "config.json").read_text())["auto_map"]
    _check_parity(model, path)


@pytest.mark.parametrize(
    "overrides",
    [
        {"intra": {"num_query_groups": 2, "branch_norm": "none", "fusion": "add",
                   "branch_scalars": True}},
        {"intra": {"num_query_groups": 2, "branch_norm": "rmsnorm", "fusion": "subtract",
                   "branch_scalars": True}, "tie_embeddings": True},
        {"intra": {"num_query_groups": 2, "dim_ratio": "1:3"}, "pattern": {"layout": "HMHH"}},
        {"moe": {"num_experts": 4, "top_k": 1, "expert_ffn_hidden_size": 32,
                 "shared_expert_ffn_hidden_size": 48}},
    ],
    ids=["add-scalars", "subtract-norm-tied", "ratio1:3", "moe-top1-shared"],
)
def test_remote_code_variants(single_rank, tmp_path, overrides):
    model, path, _ = _export(tmp_path, tiny_model("intra", **overrides), "remote_code")
    _check_parity(model, path)


# ---------------------------------------------------------------- falcon_h1


def _falcon_intra(fusion, scalars=False, **extra):
    return tiny_model(
        "intra",
        pattern={"layout": "HHHH"},
        intra={"num_query_groups": 2, "branch_norm": "none", "fusion": fusion,
               "branch_scalars": scalars},
        **extra,
    )


@pytest.mark.parametrize(
    "fusion,scalars", [("add", False), ("subtract", True), ("concat", True)]
)
def test_falcon_h1_parity(single_rank, tmp_path, fusion, scalars):
    cfg = _falcon_intra(fusion, scalars)
    assert choose_target(ModelConfig(**cfg))[0] == "falcon_h1"
    model, path, chosen = _export(tmp_path, cfg, "auto")
    assert chosen == "falcon_h1"
    assert json.loads((path / "config.json").read_text())["architectures"] == ["FalconH1ForCausalLM"]
    _check_parity(model, path)


def test_falcon_h1_zero_filled_branches(single_rank, tmp_path):
    """Mamba blocks (mixer-only) beside intra blocks: attention branch and FFN zero-filled."""
    cfg = tiny_model("intra", mamba_block_ffn=False, intra={
        "num_query_groups": 2, "branch_norm": "none", "fusion": "concat", "mixer_width": 256})
    assert choose_target(ModelConfig(**cfg))[0] == "remote_code"  # auto avoids the padding
    model, path, _ = _export(tmp_path, cfg, "falcon_h1")
    _check_parity(model, path)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"intra": {"num_query_groups": 2, "branch_norm": "rmsnorm"}}, "branch_norm"),
        ({"intra": {"num_query_groups": 2, "branch_norm": "none"}, "moe": True}, "model.moe"),
        ({"intra": {"num_query_groups": 2, "branch_norm": "none"},
          "attention": {"num_heads": 4, "num_query_groups": 2, "sliding_window": 8}}, "sliding_window"),
        ({"intra": {"num_query_groups": 2, "branch_norm": "none"}}, "mixer_width"),  # M != branch
        ({"intra": {"num_query_groups": 2, "branch_norm": "none"}, "pattern": {"layout": "HHHH"},
          "norm_epsilon": 1e-6}, "norm_epsilon"),
    ],
    ids=["branch-norm", "moe", "swa", "mamba-width", "eps"],
)
def test_falcon_h1_refuses_inexact(single_rank, tmp_path, overrides, needle):
    moe = overrides.pop("moe", False)
    cfg = tiny_model("intra", moe=moe, **overrides)
    with pytest.raises(NotExactError, match=needle):
        choose_target(ModelConfig(**cfg), "falcon_h1")
    with pytest.raises(NotExactError):
        export_model(ModelConfig(**cfg), {}, tmp_path / "never", "falcon_h1", "fp32")
    assert not (tmp_path / "never").exists()
    assert choose_target(ModelConfig(**cfg), "auto")[0] == "remote_code"


# ---------------------------------------------------------------- nemotron_h


def test_nemotron_h_parity(single_rank, tmp_path):
    cfg = tiny_model("mamba", mamba_block_ffn=False)
    model, path, chosen = _export(tmp_path, cfg, "auto")
    assert chosen == "nemotron_h"
    # transformers 5.23 cannot build a cache for a NemotronH without attention layers
    # (DynamicCache.get_seq_length raises), so its generate runs here without a cache.
    _check_parity(model, path, generate_with_cache=False)


@pytest.mark.parametrize(
    "kind,overrides,needle",
    [
        ("mamba", {}, "mamba_block_ffn"),
        ("transformer", {}, "rotary"),
        ("inter", {"mamba_block_ffn": False}, "rotary"),
        ("intra", {}, "intra-layer"),
    ],
)
def test_nemotron_h_refuses_inexact(kind, overrides, needle):
    with pytest.raises(NotExactError, match=needle):
        choose_target(ModelConfig(**tiny_model(kind, **overrides)), "nemotron_h")


# ---------------------------------------------------------------- round trips, writer


@pytest.mark.parametrize("target", ["falcon_h1", "nemotron_h"])
def test_round_trip_to_hf_from_hf_is_identity(single_rank, tmp_path, target):
    cfg = _falcon_intra("concat") if target == "falcon_h1" else tiny_model("mamba", mamba_block_ffn=False)
    model, path, _ = _export(tmp_path, cfg, target)
    model_dict, sd = from_hf(path)
    ours = full_state(model)
    assert set(sd) == set(ours)
    for k in ours:
        assert torch.equal(sd[k], ours[k]), k
    # the recovered config builds a model that takes the weights and gives the same logits
    rebuilt = build_single(model_dict)
    rebuilt.load_state_dict(sd, strict=False)
    rebuilt.eval()
    tokens = _tokens()
    assert torch.equal(our_logits(rebuilt, tokens), our_logits(model, tokens))


def test_sharded_export_and_refusal_to_overwrite(single_rank, tmp_path):
    cfg = tiny_model("inter")
    model, path, _ = _export(tmp_path, cfg, "remote_code", max_shard_bytes=64 * 1024)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not list(tmp_path.glob(".export-*partial*"))  # the temp dir was renamed away
    _check_parity(model, path)
    with pytest.raises(Exception, match="not empty"):
        export_model(ModelConfig(**cfg), full_state(model), path, "remote_code", "fp32", progress=False)


def test_bf16_export_loads(single_rank, tmp_path):
    cfg = _falcon_intra("concat")
    model = build_single(cfg)
    path, _, _ = export_model(ModelConfig(**cfg), full_state(model), tmp_path / "bf16", "auto", "bf16",
                              progress=False)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---------------------------------------------------------------- trained checkpoint at TP=2


def _tp2_logits(rank, world, ckpt, tokens):
    """On 2 ranks: load the checkpoint at TP=2, gather the vocab-parallel logits."""
    import torch.distributed as dist

    from hybrid_megatron.config.parallel import ParallelConfig
    from hybrid_megatron.training.restore import load_trained_model

    _, model = load_trained_model(ckpt, ParallelConfig(tp=2))
    tokens = torch.tensor(tokens)
    b, s = tokens.shape
    with torch.no_grad():
        local = model(tokens, torch.arange(s).expand(b, s).contiguous(), None).float()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=-1).tolist()


@pytest.mark.slow
def test_checkpoint_trained_at_tp2_exports_exactly(tmp_path):
    """Train tiny_intra 4 steps at TP=2; the CLI export (loaded at TP=1) matches TP=2 logits."""
    from tests.distributed import run_distributed
    from tests.training_helpers import REPO, start_job, wait_job

    run = tmp_path / "run"
    overrides = [f"checkpoint.dir={run}/checkpoints", "train.steps=4", "train.warmup_steps=1",
                 "checkpoint.interval=4", "train.eval_interval=0", "tracking.enabled=false",
                 "parallel.tp=2"]
    assert wait_job(start_job(str(REPO / "recipes/tiny_intra.yaml"), overrides, 2, run / "logs")) == [0, 0]
    out = tmp_path / "hf"
    cli = subprocess.run(
        [sys.executable, "-m", "hybrid_megatron.convert", "to-hf", "--checkpoint",
         str(run / "checkpoints"), "--output", str(out), "--dtype", "fp32"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert cli.returncode == 0, cli.stderr
    assert "remote_code" in cli.stdout  # tiny_intra normalises its branches
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    hf = load_hf(out)
    tokens = _tokens(vocab=hf.config.vocab_size)
    ref = torch.tensor(run_distributed(_tp2_logits, 2, tmp_path, str(run / "checkpoints"), tokens.tolist())[0])
    diff = (ref - hf_logits(hf, tokens)).abs().max().item()
    assert diff < TOL, diff
