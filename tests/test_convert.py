"""Checkpoint conversion to Hugging Face layouts, verified by logits parity.

Every parity test builds a tiny model, randomises all weights (norms, A_log, D, dt_bias and
branch scalars included), exports it in fp32, loads the export with transformers (pinned:
see PINNED_TRANSFORMERS) and checks max |logits diff| < 1e-4 on a random batch plus 32 greedy
tokens: ours recomputes the whole prefix each step, transformers' ``generate`` uses its caches.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

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
        ModelConfig(**cfg_dict),
        full_state(model),
        tmp_path / f"export-{target}",
        target,
        "fp32",
        progress=False,
        **kw,
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
            theirs = hf.generate(
                prompt,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                use_cache=False,
                pad_token_id=0,
                eos_token_id=None,
                attention_mask=torch.ones_like(prompt),
            )
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
        {"intra": {"num_query_groups": 2, "branch_norm": "none", "fusion": "add", "branch_scalars": True}},
        {
            "intra": {
                "num_query_groups": 2,
                "branch_norm": "rmsnorm",
                "fusion": "subtract",
                "branch_scalars": True,
            },
            "tie_embeddings": True,
        },
        {"intra": {"num_query_groups": 2, "dim_ratio": "1:3"}, "pattern": {"layout": "HMHH"}},
        {
            "moe": {
                "num_experts": 4,
                "top_k": 1,
                "expert_ffn_hidden_size": 32,
                "shared_expert_ffn_hidden_size": 48,
            }
        },
        {"norm_epsilon": 1e-2},
    ],
    ids=["add-scalars", "subtract-norm-tied", "ratio1:3", "moe-top1-shared", "eps1e-2"],
)
def test_remote_code_variants(single_rank, tmp_path, overrides):
    model, path, _ = _export(tmp_path, tiny_model("intra", **overrides), "remote_code")
    _check_parity(model, path)


# ---------------------------------------------------------------- falcon_h1


def _falcon_intra(fusion, scalars=False, **extra):
    return tiny_model(
        "intra",
        pattern={"layout": "HHHH"},
        intra={"num_query_groups": 2, "branch_norm": "none", "fusion": fusion, "branch_scalars": scalars},
        **extra,
    )


@pytest.mark.parametrize(
    "fusion,scalars,eps", [("add", False, 1e-5), ("subtract", True, 1e-5), ("concat", True, 1e-2)]
)
def test_falcon_h1_parity(single_rank, tmp_path, fusion, scalars, eps):
    cfg = _falcon_intra(fusion, scalars, norm_epsilon=eps)
    assert choose_target(ModelConfig(**cfg))[0] == "falcon_h1"
    model, path, chosen = _export(tmp_path, cfg, "auto")
    assert chosen == "falcon_h1"
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["FalconH1ForCausalLM"] and config["rms_norm_eps"] == eps
    _check_parity(model, path)


def test_falcon_h1_zero_filled_branches(single_rank, tmp_path):
    """Mamba blocks (mixer-only) beside intra blocks: attention branch and FFN zero-filled."""
    cfg = tiny_model(
        "intra",
        mamba_block_ffn=False,
        intra={"num_query_groups": 2, "branch_norm": "none", "fusion": "concat", "mixer_width": 256},
    )
    assert choose_target(ModelConfig(**cfg))[0] == "remote_code"  # auto avoids the padding
    model, path, _ = _export(tmp_path, cfg, "falcon_h1")
    _check_parity(model, path)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"intra": {"num_query_groups": 2, "branch_norm": "rmsnorm"}}, "branch_norm"),
        ({"intra": {"num_query_groups": 2, "branch_norm": "none"}, "moe": True}, "model.moe"),
        (
            {
                "intra": {"num_query_groups": 2, "branch_norm": "none"},
                "attention": {"num_heads": 4, "num_query_groups": 2, "sliding_window": 8},
            },
            "sliding_window",
        ),
        ({"intra": {"num_query_groups": 2, "branch_norm": "none"}}, "mixer_width"),  # M != branch
    ],
    ids=["branch-norm", "moe", "swa", "mamba-width"],
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
    """Flavour llama, FFN-free Mamba2 stack: no flavour-specific layer, exact as NemotronH."""
    cfg = tiny_model("mamba", mamba_block_ffn=False)
    model, path, chosen = _export(tmp_path, cfg, "auto")
    assert chosen == "nemotron_h"
    # transformers 5.23 cannot build a cache for a NemotronH without attention layers
    # (DynamicCache.get_seq_length raises), so its generate runs here without a cache.
    _check_parity(model, path, generate_with_cache=False)


def _nemotron(kind, moe=False, **overrides):
    """tiny_model of ``kind`` in flavour nemotron_h; ``moe``: False, True (the default MoE) or
    a whole ``moe`` section."""
    cfg = tiny_model(kind, moe=moe is True, flavour="nemotron_h", **overrides)
    if isinstance(moe, dict):
        cfg["moe"] = dict(moe)
    return cfg


NEMOTRON_H_CASES = {
    "transformer-dense": _nemotron("transformer"),
    "transformer-moe": _nemotron("transformer", moe=True),
    "mamba-dense": _nemotron("mamba"),
    "mamba-moe": _nemotron("mamba", moe=True),
    "inter-dense": _nemotron("inter"),
    "inter-moe": _nemotron("inter", moe=True),
    # single-sublayer letters, mixer-only Mamba, shared expert, routed scaling, eps, tied
    "inter-letters-shared-eps-tied": _nemotron(
        "inter",
        num_layers=6,
        mamba_block_ffn=False,
        norm_epsilon=1e-2,
        tie_embeddings=True,
        pattern={"ratio": None, "layout": "M*-MEA", "allow_early_attention": True},
        moe={
            "num_experts": 4,
            "top_k": 2,
            "expert_ffn_hidden_size": 64,
            "shared_expert_ffn_hidden_size": 48,
            "topk_scaling_factor": 2.5,
        },
    ),
    # top-1 sigmoid routing (no renormalisation) without an expert bias
    "transformer-moe-top1-nobias": _nemotron(
        "transformer", moe={"num_experts": 4, "top_k": 1, "expert_ffn_hidden_size": 64, "expert_bias": False}
    ),
}
_HF_LETTER = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}


@pytest.mark.parametrize("name", list(NEMOTRON_H_CASES))
def test_nemotron_h_flavour_parity_and_round_trip(single_rank, tmp_path, name):
    """Flavour nemotron_h exports (auto) as NemotronHForCausalLM: logits and 32 greedy tokens
    match (HF's cached generate where there is attention), from-hf gives back every weight."""
    from megatron.core.ssm.mamba_mixer import MambaMixer

    raw = NEMOTRON_H_CASES[name]
    cfg = ModelConfig(**raw)
    model, path, chosen = _export(tmp_path, raw, "auto")
    assert chosen == "nemotron_h"
    config = json.loads((path / "config.json").read_text())
    pattern = model.layer_pattern
    ffn = "E" if cfg.moe else "-"
    expected = "".join(
        {"A": "*" + ffn, "M": "M" + (ffn if cfg.mamba_block_ffn else "")}.get(c, c) for c in pattern
    )
    assert "".join(_HF_LETTER[t] for t in config["layers_block_type"]) == expected
    assert config["hybrid_override_pattern"] == expected
    assert config["layer_norm_epsilon"] == cfg.norm_epsilon
    mixers = [
        layer.self_attention for layer in model.decoder.layers if isinstance(layer.self_attention, MambaMixer)
    ]
    assert all(m.norm.eps == cfg.norm_epsilon for m in mixers)  # megatron-core's own is 1e-5
    _check_parity(model, path, generate_with_cache="*" in expected)

    model_dict, sd = from_hf(path)
    ours = full_state(model)
    for k in set(sd) - set(ours):  # no expert bias: exported as zeros, read back as a bias
        assert k.endswith("router.expert_bias") and not cfg.moe_expert_bias and not sd[k].any(), k
    assert set(ours) <= set(sd)
    for k in ours:
        assert torch.equal(sd[k], ours[k]), k
    rebuilt = build_single(model_dict)
    assert rebuilt.layer_pattern == pattern
    rebuilt.load_state_dict(sd, strict=False)
    rebuilt.eval()
    tokens = _tokens()
    assert torch.equal(our_logits(rebuilt, tokens), our_logits(model, tokens))


@pytest.mark.parametrize(
    "kind,overrides,needle",
    [
        ("mamba", {}, "mamba_block_ffn"),
        ("transformer", {}, "rotary"),
        ("inter", {"mamba_block_ffn": False}, "rotary"),
        ("intra", {}, "intra-layer"),
        ("swa", {"flavour": "nemotron_h"}, "sliding_window"),
        (
            "transformer",
            {"flavour": "nemotron_h", "moe": {"num_experts": 4, "score_function": "softmax"}},
            "score_function",
        ),
    ],
)
def test_nemotron_h_refuses_inexact(kind, overrides, needle):
    moe = overrides.pop("moe", None)
    raw = tiny_model(kind, **overrides)
    if moe is not None:
        raw["moe"] = moe
    with pytest.raises(NotExactError, match=needle):
        choose_target(ModelConfig(**raw), "nemotron_h")


def test_nemotron_h_flavour_has_no_other_target():
    cfg = ModelConfig(**_nemotron("inter", moe=True))
    for target in ("remote_code", "falcon_h1"):
        with pytest.raises(NotExactError, match="model.flavour") as err:
            choose_target(cfg, target)
        assert "use --target nemotron_h" in str(err.value)
    with pytest.raises(NotExactError, match="no export target is exact.*sliding_window"):
        choose_target(ModelConfig(**_nemotron("swa")), "auto")


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
    """A bf16 export holds bf16 tensors, loads with transformers as a bf16 model of the chosen
    target's class, and (loaded in fp32) gives our model's logits once our weights are rounded
    to bf16 as the export rounded them."""
    cfg = _falcon_intra("concat")
    model = build_single(cfg)
    perturb(model, 0)
    model.eval()
    path, chosen, _ = export_model(
        ModelConfig(**cfg), full_state(model), tmp_path / "bf16", "auto", "bf16", progress=False
    )
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"

    from transformers import AutoModelForCausalLM

    as_saved = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="auto")
    assert type(as_saved).__name__ == config["architectures"][0]
    assert {p.dtype for p in as_saved.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    tokens = _tokens()
    diff = (our_logits(model, tokens) - hf_logits(load_hf(path), tokens)).abs().max().item()
    assert diff < TOL, f"{chosen}: max |logits diff| {diff}"


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
    """Train intra_tiny 4 steps at TP=2; the CLI export (loaded at TP=1) matches TP=2 logits."""
    from tests.distributed import run_distributed
    from tests.training_helpers import REPO, start_job, wait_job

    run = tmp_path / "run"
    overrides = [
        f"checkpoint.dir={run}/checkpoints",
        "train.steps=4",
        "train.warmup_steps=1",
        "checkpoint.interval=4",
        "train.eval_interval=0",
        "tracking.enabled=false",
        "parallel.tp=2",
    ]
    assert wait_job(start_job(str(REPO / "recipes/intra_tiny.yaml"), overrides, 2, run / "logs")) == [0, 0]
    out = tmp_path / "hf"
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybrid_megatron.convert",
            "to-hf",
            "--checkpoint",
            str(run / "checkpoints"),
            "--output",
            str(out),
            "--dtype",
            "fp32",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cli.returncode == 0, cli.stderr
    assert "remote_code" in cli.stdout  # intra_tiny normalises its branches
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    hf = load_hf(out)
    tokens = _tokens(vocab=hf.config.vocab_size)
    ref = torch.tensor(
        run_distributed(_tp2_logits, 2, tmp_path, str(run / "checkpoints"), tokens.tolist())[0]
    )
    diff = (ref - hf_logits(hf, tokens)).abs().max().item()
    assert diff < TOL, diff


# ---------------------------------------------------------------- from-hf -> continued pretraining


def _random_nemotron_h(path, vocab: int):
    """A tiny NemotronHForCausalLM (every layer type) with random, structured weights, saved."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = NemotronHConfig(
        vocab_size=vocab,
        hidden_size=64,
        layers_block_type=["mamba", "mlp", "attention", "moe"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        ssm_state_size=8,
        mamba_num_heads=8,
        mamba_head_dim=16,
        n_groups=2,
        chunk_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48,
        routed_scaling_factor=1.5,
        layer_norm_epsilon=1e-4,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    hf = NemotronHForCausalLM(config)
    perturb(hf, 3)
    hf.save_pretrained(path)
    return hf.eval()


def test_from_hf_then_init_from_trains_from_the_hf_weights(single_rank, tmp_path, monkeypatch):
    """from-hf (CLI) a random NemotronH; a recipe with checkpoint.init_from trains 3 steps from
    it: step 1's loss (before any update) is the HF model's loss on the same batch."""
    import torch.nn.functional as F

    from hybrid_megatron.config import load_recipe
    from hybrid_megatron.convert.__main__ import main as convert_main
    from hybrid_megatron.training import step
    from hybrid_megatron.training.checkpoint import CheckpointError
    from hybrid_megatron.training.entry import train
    from tests.training_helpers import REPO, read_losses

    hf = _random_nemotron_h(tmp_path / "hf", vocab=4096)  # the demo tokenizer's vocabulary
    converted = tmp_path / "converted"
    assert convert_main(["from-hf", "--hf", str(tmp_path / "hf"), "--output", str(converted)]) == 0
    model_yaml = (converted / "model.yaml").read_text()
    assert "nemotron_h" in model_yaml and (converted / "metadata.json").exists()

    recipe_file = tmp_path / "continue.yaml"
    recipe_file.write_text(f"extends: {REPO / 'recipes' / 'bases' / 'tiny.yaml'}\n" + model_yaml)
    run = tmp_path / "run"
    overrides = [
        f"checkpoint.dir={run}/checkpoints",
        f"checkpoint.init_from={converted}",
        f"data.tokenizer={REPO}/data/tokenizer",  # the base's paths are relative
        f"data.blend={REPO}/data/austen_4k_text_document",
        "train.steps=3",
        "train.warmup_steps=1",
        "train.eval_interval=0",
        "train.log_interval=1",
        "tracking.enabled=false",
    ]
    first = []
    real = step.run_schedule

    def recording(model_chunks, micro, seq, forward_only):
        if not first:
            first.append([{k: v.clone() for k, v in b.items()} for b in micro])
        return real(model_chunks, micro, seq, forward_only)

    monkeypatch.setattr(step, "run_schedule", recording)
    summary = train(load_recipe(recipe_file, overrides))
    assert summary["steps"] == 3
    losses = {k: float.fromhex(v) for k, v in read_losses(run).items()}

    with torch.no_grad():  # the trainer's loss: mean over micro-batches of the masked mean CE
        per_micro = []
        for b in first[0]:
            logits = hf(input_ids=b["tokens"], use_cache=False).logits.float()
            ce = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="none")
            mask = b["loss_mask"].flatten().float()
            per_micro.append(float((ce * mask).sum() / mask.sum()))
    hf_loss = sum(per_micro) / len(per_micro)
    assert abs(hf_loss - math.log(4096)) > 0.2  # structured weights: not a uniform guess
    assert abs(losses[1] - hf_loss) < TOL, (losses[1], hf_loss)
    assert losses[3] != losses[1]  # it trained

    # a recipe whose model differs from the checkpoint's is refused, naming the field
    other = load_recipe(
        recipe_file, overrides[1:] + [f"checkpoint.dir={tmp_path}/other/ckpt", "model.norm_epsilon=1e-5"]
    )
    with pytest.raises(CheckpointError, match="checkpoint.init_from: .*model.norm_epsilon"):
        train(other)


def _cli_error(capsys, *argv) -> str:
    """Run the convert CLI with ``argv``; asserts exit code 2 and one ``error:`` line on stderr
    (no traceback); returns that line."""
    from hybrid_megatron.convert.__main__ import main

    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_convert_cli_bad_input_is_one_line(tmp_path, capsys):
    """Missing or broken inputs of to-hf and from-hf: one line naming the problem, exit 2,
    nothing written. A model_type we do not read is refused before its weights are read."""
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "neither a checkpoint directory nor a root with 'latest'" in _cli_error(
        capsys, "to-hf", "--checkpoint", str(empty), "--output", str(out)
    )
    assert f"{empty}: not a Hugging Face model directory (no config.json)" in _cli_error(
        capsys, "from-hf", "--hf", str(empty), "--output", str(out)
    )
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{model_type: nemotron_h")
    assert f"{hf / 'config.json'}: not valid JSON" in _cli_error(
        capsys, "from-hf", "--hf", str(hf), "--output", str(out)
    )
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "model_type 'llama'; from-hf reads nemotron_h and falcon_h1" in _cli_error(
        capsys, "from-hf", "--hf", str(hf), "--output", str(out)
    )
    (hf / "config.json").write_text(json.dumps({"model_type": "nemotron_h"}))
    assert f"{hf / 'model.safetensors'}: weights file missing" in _cli_error(
        capsys, "from-hf", "--hf", str(hf), "--output", str(out)
    )
    (hf / "model.safetensors").write_bytes(b"\x07" * 64)
    assert f"{hf / 'model.safetensors'}: not a readable safetensors file" in _cli_error(
        capsys, "from-hf", "--hf", str(hf), "--output", str(out)
    )
    assert not out.exists()
