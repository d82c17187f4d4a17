"""TP=2 / PP=2 / EP=2 reproduce TP=1 / PP=1 / EP=1 for every kind, dense and MoE, and for the
nemotron_h flavour (CPU, gloo).

Weights move between layouts the way users move them: a megatron-core distributed checkpoint
saved at one layout and loaded at the other. So these tests also check that every module's
sharded_state_dict is layout-independent.
"""

from __future__ import annotations

import os
from functools import partial

import pytest

from tests.convert_helpers import perturb
from tests.distributed import build_parallel_model as _build
from tests.distributed import run_distributed
from tests.model_configs import KINDS, tiny_model

BATCH, SEQ = 2, 24


def _batch(vocab: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous(),
        "loss_mask": torch.ones(BATCH, SEQ),
    }


def _loss_through_schedule(model, batch) -> float | None:
    """Mean token loss from megatron-core's forward-backward schedule (None off the last stage)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(loss_mask, output_tensor):
        loss = (output_tensor.float() * loss_mask).sum() / loss_mask.sum()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        return out, partial(loss_func, b["loss_mask"])

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    if parallel_state.is_pipeline_last_stage():
        return float(losses[0]["loss"])
    return None


def _full_logits(model, batch):
    import torch
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)
    return gather_from_tensor_model_parallel_region(logits)


def _embedding_grad(model):
    """The word-embedding gradient with every TP rank's vocabulary rows, gathered. It is the last
    gradient backward computes, so a wrong backward in any layer changes it."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    grad = model.embedding.word_embeddings.weight.grad
    shards = [torch.empty_like(grad) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards)


def _scale_grads(model) -> dict:
    """Gradients of the intra block's replicated branch scalars (TP must sum them exactly)."""
    return {n: float(p.grad) for n, p in model.named_parameters() if n.endswith("_scale")}


def _rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def equivalence_worker(
    rank: int, world: int, cfg_dict: dict, ckpt_dir: str, moe: bool, layouts: dict | None = None
) -> dict:
    """Reference at TP=PP=EP=1, then the same weights at TP=2, PP=2 and (MoE) EP=2 and TP=2 x
    EP=2 with whole experts, or at the given ``layouts`` (name -> ParallelConfig fields)."""
    import torch
    from megatron.core import dist_checkpointing, parallel_state

    torch.use_deterministic_algorithms(True)
    batch = _batch(cfg_dict["vocab_size"])
    out = {}

    model = _build(cfg_dict, {})
    # Random norms, scalars, SSM parameters and routers' expert biases: at their initial values
    # (ones, zeros) a layout that ignored or mis-sharded one would still match.
    perturb(model, seed=5)
    model.eval()
    ref_logits = _full_logits(model, batch)
    model.train()
    ref_loss = _loss_through_schedule(model, batch)
    ref_scale_grads = _scale_grads(model)
    vocab = cfg_dict["vocab_size"]
    ref_embedding_grad = _embedding_grad(model)[:vocab]
    model.zero_grad()
    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    out["num_params_tp1"] = sum(p.numel() for p in model.parameters())

    layouts = layouts or {
        "tp2_sp": {"tp": 2, "sequence_parallel": True},
        "pp2": {"pp": 2},
        "pp2_uneven": {"pp": 2, "pipeline_stage_layers": [1, 3]},
    }
    if not moe and "tp2_sp" in layouts:  # megatron-core allows MoE with TP only with SP
        layouts["tp2"] = {"tp": 2}
    if moe and "tp2_sp" in layouts:
        layouts["ep2"] = {"ep": 2}
        # MoE parallel folding: dense layers split over TP 2, whole experts spread over the
        # same 2 ranks (expert TP 1 x EP 2), the only way to have both on 2 GPUs.
        layouts["tp2_ep2_folded"] = {"tp": 2, "sequence_parallel": True, "ep": 2, "expert_tp": 1}
    for name, layout in layouts.items():
        model = _build(cfg_dict, layout)
        out[f"{name}_expert_tp"] = parallel_state.get_expert_tensor_parallel_world_size()
        state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
        model.load_state_dict(state)
        if layout.get("pp", 1) == 1:
            model.eval()
            out[f"{name}_logits_rel_err"] = _rel_err(_full_logits(model, batch), ref_logits)
            model.train()
        loss = _loss_through_schedule(model, batch)
        if loss is not None:
            out[f"{name}_loss_abs_err"] = abs(loss - ref_loss)
        if layout.get("pp", 1) == 1:
            out[f"{name}_embedding_grad_rel_err"] = _rel_err(
                _embedding_grad(model)[:vocab], ref_embedding_grad
            )
        if layout.get("pp", 1) == 1 and ref_scale_grads:
            grads = _scale_grads(model)
            out[f"{name}_scale_grad_rel_err"] = max(
                abs(grads[k] - ref_scale_grads[k]) / abs(ref_scale_grads[k]) for k in ref_scale_grads
            )
        if name.startswith(("pp2", "tp2_pp2")):
            out[f"{name}_stage_params"] = sum(p.numel() for p in model.parameters())
            out[f"{name}_stage_layers"] = len(model.decoder.layers)
    out["ref_loss"] = ref_loss
    return out


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize(
    "kind",
    KINDS + ["intra_scalars", pytest.param("nemotron_h", marks=pytest.mark.slow)],  # ~50 s
)
def test_parallel_layouts_match_single_rank(kind, moe, tmp_path):
    if kind == "intra_scalars":  # subtract fusion with learnable branch scalars
        if moe:
            pytest.skip("covered by the dense case")
        cfg = tiny_model("intra", intra={"fusion": "subtract", "branch_scalars": True})
    elif kind == "nemotron_h":  # flavour nemotron_h: a block, an attention-only and an FFN-only layer
        cfg = tiny_model(
            "inter",
            moe=moe,
            flavour="nemotron_h",
            pattern={"ratio": None, "layout": "M*A" + ("E" if moe else "-"), "allow_early_attention": True},
        )
    else:
        cfg = tiny_model(kind, moe=moe)
    ranks = run_distributed(equivalence_worker, 2, tmp_path, cfg, str(tmp_path / "ckpt"), moe)
    for r in ranks:
        for layout in ("tp2_sp", "tp2", "ep2", "tp2_ep2_folded"):
            if f"{layout}_logits_rel_err" in r:  # the layouts without PP
                assert r[f"{layout}_embedding_grad_rel_err"] < 1e-4, (layout, r)
        assert r["tp2_sp_logits_rel_err"] < 1e-5, r
        assert r["tp2_sp_loss_abs_err"] < 1e-5, r
        if not moe:
            assert r["tp2_logits_rel_err"] < 1e-5, r
            assert r["tp2_loss_abs_err"] < 1e-5, r
        if moe:
            assert r["ep2_logits_rel_err"] < 1e-5, r
            assert r["ep2_loss_abs_err"] < 1e-5, r
            assert (r["tp2_sp_expert_tp"], r["tp2_ep2_folded_expert_tp"]) == (2, 1), r
            assert r["tp2_ep2_folded_logits_rel_err"] < 1e-5, r
            assert r["tp2_ep2_folded_loss_abs_err"] < 1e-5, r
        assert r["pp2_stage_layers"] == 2, r
        if kind == "intra_scalars":
            assert r["tp2_scale_grad_rel_err"] < 1e-4, r
            assert r["tp2_sp_scale_grad_rel_err"] < 1e-4, r
        assert r["ref_loss"] > 1.0, r  # a real LM loss (ln 96 ~ 4.56), not a degenerate 0
    # PP: the loss exists on the last stage only; the two stages hold disjoint layers.
    assert abs(ranks[1]["pp2_loss_abs_err"]) < 1e-5, ranks[1]
    assert "pp2_loss_abs_err" not in ranks[0]
    assert ranks[0]["pp2_stage_params"] + ranks[1]["pp2_stage_params"] == ranks[0]["num_params_tp1"]
    # explicit per-stage layer counts: stage 0 builds 1 block, stage 1 builds 3
    assert [r["pp2_uneven_stage_layers"] for r in ranks] == [1, 3]
    assert abs(ranks[1]["pp2_uneven_loss_abs_err"]) < 1e-5, ranks[1]


@pytest.mark.slow
def test_tp2_x_pp2_intra_moe_matches_single_rank(tmp_path):
    """intra_1b_moe's layout on 4 CPU ranks: the intra MoE hybrid at TP=2 x PP=2 (with SP) gives the
    single-rank loss from the same checkpoint; each TP pair of a stage agrees."""
    cfg = tiny_model("intra", moe=True)
    layouts = {"tp2_pp2": {"tp": 2, "pp": 2, "sequence_parallel": True}}
    ranks = run_distributed(equivalence_worker, 4, tmp_path, cfg, str(tmp_path / "ckpt"), True, layouts)
    # megatron-core's rank order is TP fastest, then PP: ranks 2 and 3 hold the last stage.
    assert "tp2_pp2_loss_abs_err" not in ranks[0] and "tp2_pp2_loss_abs_err" not in ranks[1]
    for r in ranks[2:]:
        assert r["tp2_pp2_loss_abs_err"] < 1e-5, r
        assert r["ref_loss"] > 1.0, r
    stage_params = [r["tp2_pp2_stage_params"] for r in ranks]
    # the two TP ranks of a stage hold equally sized shards of the same blocks
    assert stage_params[0] == stage_params[1] and stage_params[2] == stage_params[3]
    assert [r["tp2_pp2_stage_layers"] for r in ranks] == [2, 2, 2, 2]
