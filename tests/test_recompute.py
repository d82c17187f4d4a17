"""train.recompute: selective / full activation recomputation gives the same loss and gradients
as none, and really recomputes (the recomputed modules run twice per step)."""

from __future__ import annotations

import pytest
import torch

from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.config.train import TrainConfig
from hybrid_megatron.models import build_model
from hybrid_megatron.training.parallel_setup import setup_model_parallel
from hybrid_megatron.training.trainer import reset_run_state
from tests.model_configs import tiny_model


def _loss_and_grads(cfg: dict, recompute: str):
    """Build the model (seed 3), run forward + backward on a fixed batch; return
    (loss, {name: grad}, forward calls of layer 0's self-attention core or mixer)."""
    reset_run_state()  # megatron-core's MoE loss tracker is sized by the first model built
    setup_model_parallel(ParallelConfig(), seed=3)
    model = build_model(ModelConfig(**cfg), recompute=recompute)
    calls = {"n": 0}
    counted = _counted_module(model, recompute)
    counted.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 16), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    position_ids = torch.arange(16).expand(2, 16)
    loss = model(tokens, position_ids, None, labels=labels).float().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, calls["n"]


def _counted_module(model, recompute: str):
    """The module whose forward calls reveal recomputation: the attention core for selective
    (megatron-core's 'core_attn'), the first layer's mixer for full."""
    for name, module in model.named_modules():
        if recompute == "selective" and name.endswith("core_attention"):
            return module
        if recompute != "selective" and name == "decoder.layers.0":
            return module
    raise AssertionError("no module to count")


@pytest.mark.parametrize("kind,moe", [("transformer", False), ("inter", True), ("intra", False)])
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_matches_no_recompute(single_rank, kind, moe, recompute):
    cfg = tiny_model(kind, moe=moe)
    base_loss, base_grads, base_calls = _loss_and_grads(cfg, "none")
    loss, grads, calls = _loss_and_grads(cfg, recompute)
    assert loss == pytest.approx(base_loss, abs=1e-6)
    assert grads.keys() == base_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, base_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    # The recomputed module ran again in backward: one extra forward per call.
    assert calls == 2 * base_calls > 0


def test_recompute_field_is_validated():
    with pytest.raises(ValueError, match="recompute"):
        TrainConfig(global_batch_size=1, steps=2, lr=1e-3, recompute="some")
