"""Context parallelism (CP) reproduces CP=1: logits, loss and every parameter's gradient, for the
attention kinds and for Mamba layers in ``heads`` mode, dense and MoE, and with TP=2 x CP=2
(CPU, gloo: attention all-gathers keys and values there).

Weights move from CP=1 to CP=2 through a megatron-core distributed checkpoint, as in
tests/test_parallel_equivalence.py, so the checkpoint's independence of CP is checked too.
"""

from __future__ import annotations

import os

import pytest

from tests.convert_helpers import perturb
from tests.distributed import build_parallel_model as _build
from tests.distributed import run_distributed
from tests.model_configs import tiny_model

BATCH, SEQ = 2, 24


def _batch(vocab: int, masked: bool = True):
    import torch

    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    loss_mask = torch.ones(BATCH, SEQ)
    if masked:  # unequal token counts per CP rank: the loss must weigh ranks by their counts
        loss_mask[0, 17:] = 0
        loss_mask[1, :3] = 0
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous(),
        "loss_mask": loss_mask,
    }


def _full_logits(model, batch):
    """Logits of the whole batch [b, s, v], gathered over TP and put back in sequence order
    from every CP rank's two chunks."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.core.utils import get_batch_on_this_cp_rank

    from hybrid_megatron.models.context_parallel_attention import context_parallel_positions

    local = get_batch_on_this_cp_rank(dict(batch))
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(local["tokens"], local["position_ids"], None))
    group = parallel_state.get_context_parallel_group()
    cp = group.size()
    if cp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(cp)]
    dist.all_gather(parts, logits.contiguous(), group=group)
    full = torch.empty(logits.shape[0], SEQ, logits.shape[2], dtype=logits.dtype)
    for r, part in enumerate(parts):
        full[:, context_parallel_positions(logits.shape[1], cp, r)] = part
    return full


def _grads(model) -> dict:
    """Every parameter's gradient, summed over the CP group and divided by its size (what DDP's
    average over the dp x cp group does)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_context_parallel_group()
    out = {}
    for name, p in model.named_parameters():
        grad = p.grad.detach().clone()
        dist.all_reduce(grad, group=group)
        out[name] = grad / group.size()
    return out


def _rel_err(a, b) -> float:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)


def cp_worker(rank: int, world: int, cfg_dict: dict, ckpt_dir: str, layouts: dict) -> dict:
    """Reference at CP=1, then the same weights (through a checkpoint) at each layout."""
    import torch
    from megatron.core import dist_checkpointing, parallel_state

    from hybrid_megatron.training.step import micro_batch_losses

    torch.use_deterministic_algorithms(True)
    batch = _batch(cfg_dict["vocab_size"])
    out: dict = {}
    model = _build(cfg_dict, {})
    perturb(model, seed=5)
    model.eval()
    ref_logits = _full_logits(model, batch)
    model.train()
    ref_loss = float(micro_batch_losses([model], [batch], SEQ, forward_only=False)[0]["lm loss"])
    ref_grads = _grads(model)
    model.zero_grad()
    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    out["ref_loss"] = ref_loss
    for name, layout in layouts.items():
        model = _build(cfg_dict, layout)
        out[f"{name}_cp"] = parallel_state.get_context_parallel_world_size()
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
        model.eval()
        out[f"{name}_logits_rel_err"] = _rel_err(_full_logits(model, batch), ref_logits)
        model.train()
        loss = float(micro_batch_losses([model], [batch], SEQ, forward_only=False)[0]["lm loss"])
        out[f"{name}_loss_abs_err"] = abs(loss - ref_loss)
        grads = _grads(model)
        if layout.get("tp", 1) == 1:
            errs = {n: _rel_err(grads[n], ref_grads[n]) for n in ref_grads}
            worst = max(errs, key=errs.get)
            out[f"{name}_grad_rel_err"] = errs[worst]
            out[f"{name}_worst_grad"] = worst
            out[f"{name}_num_grads"] = len(errs)
        else:  # TP-sharded: compare the embedding's gradient, gathered over TP
            import torch.distributed as dist

            g = grads["embedding.word_embeddings.weight"]
            shards = [
                torch.empty_like(g) for _ in range(parallel_state.get_tensor_model_parallel_world_size())
            ]
            dist.all_gather(shards, g.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            vocab = cfg_dict["vocab_size"]
            out[f"{name}_grad_rel_err"] = _rel_err(
                torch.cat(shards)[:vocab], ref_grads["embedding.word_embeddings.weight"][:vocab]
            )
    return out


def _check(ranks: list, layouts: dict) -> None:
    for r in ranks:
        assert r["ref_loss"] > 1.0, r  # a real LM loss (ln 96 ~ 4.56)
        for name, layout in layouts.items():
            assert r[f"{name}_cp"] == layout["cp"], r
            assert r[f"{name}_logits_rel_err"] < 1e-5, (name, r)
            assert r[f"{name}_loss_abs_err"] < 1e-5, (name, r)
            assert r[f"{name}_grad_rel_err"] < 1e-4, (name, r)


ATTENTION_KINDS = ["transformer", "swa"]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_cp2_matches_cp1_attention_kinds(kind, moe, tmp_path):
    cfg = tiny_model(kind, moe=moe)
    layouts = {"cp2": {"cp": 2, "cp_comm": "all_gather"}}
    ranks = run_distributed(cp_worker, 2, tmp_path, cfg, str(tmp_path / "ckpt"), layouts)
    _check(ranks, layouts)
    assert ranks[0]["cp2_num_grads"] > 10, ranks[0]


def _tconfig(cp: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        context_parallel_size=cp,
        mamba_head_dim=16,
        mamba_num_groups=2,
        mamba_state_dim=8,
    )


def test_specs_switch_to_cp_parts_only_under_cp():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from hybrid_megatron.config.model import ModelConfig
    from hybrid_megatron.config.parallel import ParallelConfig
    from hybrid_megatron.models.context_parallel_attention import AllGatherKVAttention
    from hybrid_megatron.models.specs import block_spec

    cfg, intra_cfg = ModelConfig(**tiny_model("inter")), ModelConfig(**tiny_model("intra"))
    parallel = ParallelConfig(cp=2, cp_comm="all_gather", mamba_cp="heads")
    for cp, core, comm, mode in (
        (1, DotProductAttention, None, None),
        (2, AllGatherKVAttention, "all_gather", "heads"),
    ):
        attention = block_spec("A", cfg, _tconfig(cp), "local", parallel).submodules.self_attention
        assert attention.submodules.core_attention is core
        assert attention.params.get("cp_comm_type") == comm
        mamba = block_spec("M", cfg, _tconfig(cp), "local", parallel).submodules.self_attention
        assert mamba.params.get("context_parallel_mode") == mode
        assert ("context_parallel_mode" in mamba.params) == (cp > 1)
        intra = block_spec("H", intra_cfg, _tconfig(cp), "local", parallel).submodules.self_attention
        assert intra.submodules.attention.submodules.core_attention is core
        assert intra.submodules.attention.params.get("cp_comm_type") == comm
        assert intra.submodules.mamba.params.get("context_parallel_mode") == mode


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("kind", ["mamba", "inter", "intra"])
def test_cp2_matches_cp1_mamba_kinds_in_both_modes(kind, moe, tmp_path):
    """Whole models with Mamba layers at CP=2, the scan sharded by sequence and by heads: both
    reproduce CP=1 (and so agree with each other)."""
    cfg = tiny_model(kind, moe=moe)
    layouts = {
        "sequence": {"cp": 2, "mamba_cp": "sequence", "cp_comm": "all_gather"},
        "heads": {"cp": 2, "mamba_cp": "heads", "cp_comm": "all_gather"},
    }
    ranks = run_distributed(cp_worker, 2, tmp_path, cfg, str(tmp_path / "ckpt"), layouts)
    _check(ranks, layouts)


@pytest.mark.long  # 4 ranks
def test_cp4_matches_cp1_swa(tmp_path):
    # 4 ranks hold 8 chunks of 3 positions: a window of 6 spans three chunks on three ranks.
    cfg = tiny_model("swa")
    layouts = {"cp4": {"cp": 4, "cp_comm": "all_gather"}}
    ranks = run_distributed(cp_worker, 4, tmp_path, cfg, str(tmp_path / "ckpt"), layouts)
    _check(ranks, layouts)


@pytest.mark.slow
def test_tp2_x_cp2_matches_single_rank(tmp_path):
    cfg = tiny_model("transformer", moe=True)
    layouts = {"tp2_cp2": {"tp": 2, "cp": 2, "sequence_parallel": True, "cp_comm": "all_gather"}}
    ranks = run_distributed(cp_worker, 4, tmp_path, cfg, str(tmp_path / "ckpt"), layouts)
    _check(ranks, layouts)
