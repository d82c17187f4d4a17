"""The fused kernels of the TE build: TE's cross-entropy, megatron-core's fused SwiGLU, TE's
weight-gradient accumulation into DDP's fp32 buffers, and for MoE TE's fused router and token
permutation.

On CPU: the TE build asks for them and the local build does not, and wrapping a local model fuses
nothing. On a GPU (``-m gpu``): each computes what the unfused path computes."""

from __future__ import annotations

import pytest
import torch

from hybrid_megatron.config.model import ModelConfig
from tests.model_configs import tiny_model
from tests.test_gpu import _batch, _build, gpu_model

FUSION_FIELDS = (
    "bias_dropout_fusion",
    "apply_rope_fusion",
    "bias_activation_fusion",
    "cross_entropy_loss_fusion",
)
MOE_FUSION_FIELDS = ("moe_router_fusion", "moe_permute_fusion")


def test_te_build_asks_for_the_fused_kernels_and_local_build_does_not(monkeypatch):
    from hybrid_megatron.models import transformer_config
    from hybrid_megatron.models.transformer_config import fused_kernel_fields

    local = fused_kernel_fields(ModelConfig(**tiny_model("intra")))
    assert not any(local[f] for f in FUSION_FIELDS), local
    monkeypatch.setattr(transformer_config, "resolve_impl", lambda cfg: "te")
    te = fused_kernel_fields(ModelConfig(**tiny_model("intra")))
    assert all(te[f] for f in FUSION_FIELDS) and te["cross_entropy_fusion_impl"] == "te", te
    # megatron-core fuses gelu and SwiGLU only: relu2 FFNs (flavour nemotron_h) stay unfused
    relu2 = fused_kernel_fields(ModelConfig(**tiny_model("inter"), flavour="nemotron_h"))
    assert relu2["bias_activation_fusion"] is False and relu2["cross_entropy_loss_fusion"] is True
    # the MoE fusions only where there is an MoE
    assert not any(te[f] for f in MOE_FUSION_FIELDS), te
    moe = fused_kernel_fields(ModelConfig(**tiny_model("intra", moe=True)))
    assert all(moe[f] for f in MOE_FUSION_FIELDS), moe
    # FP8 with TE's experts pads the routing map in place, which the fused router's backward
    # cannot take; the grouped experts pad their own groups, so the router stays fused
    for experts, router_fused in (("te_grouped", False), ("sequential", False), ("grouped", True)):
        cfg = tiny_model("intra", moe=True, impl="te", fp8="hybrid")
        cfg["moe"] = {**cfg["moe"], "experts": experts}
        fp8 = fused_kernel_fields(ModelConfig(**cfg))
        assert fp8["moe_permute_fusion"] and fp8["moe_router_fusion"] is router_fused, (experts, fp8)
    monkeypatch.setattr(transformer_config, "resolve_impl", lambda cfg: "local")
    assert not any(
        fused_kernel_fields(ModelConfig(**tiny_model("intra", moe=True)))[f] for f in MOE_FUSION_FIELDS
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU build")
def test_local_build_fuses_nothing(single_rank):
    from hybrid_megatron.config.parallel import ParallelConfig
    from hybrid_megatron.models import build_model
    from hybrid_megatron.training.model_setup import wrap_for_training
    from hybrid_megatron.training.parallel_setup import setup_model_parallel

    setup_model_parallel(ParallelConfig(), seed=1)
    model = build_model(ModelConfig(**tiny_model("intra")))
    assert not any(getattr(model.config, f) for f in FUSION_FIELDS)
    wrap_for_training(model, bf16=False)
    assert model.config.gradient_accumulation_fusion is False  # no TE layers to switch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU build")
def test_local_build_keeps_megatrons_output_layer_under_fp8_output_layer(single_rank):
    """A recipe with model.fp8_output_layer and impl auto still builds on CPU (local layers,
    FP8 off): megatron-core's own output layer, no TE layer."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from hybrid_megatron.config.parallel import ParallelConfig
    from hybrid_megatron.models import build_model
    from hybrid_megatron.training.parallel_setup import setup_model_parallel

    setup_model_parallel(ParallelConfig(), seed=1)
    raw = tiny_model("transformer", impl="auto", fp8="hybrid", fp8_output_layer=True, vocab_size=128)
    model = build_model(ModelConfig(**raw))
    assert type(model.output_layer) is ColumnParallelLinear


def _loss_and_grads(model, ids, labels, pos):
    model.zero_grad(set_to_none=True)
    loss = model(ids, pos, None, labels=labels).float()
    loss.mean().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_unfused_matches(model, flags, loss_tol: float, grad_tol: float) -> None:
    """Per-token losses and every gradient of ``model`` (built with ``flags`` on), then again
    with ``flags`` switched off on its config (megatron-core reads them per call): equal within
    ``loss_tol`` (absolute and relative) and ``grad_tol`` (relative norm per parameter)."""
    assert all(getattr(model.config, f) is True for f in flags)  # else unfused vs unfused
    ids, labels, pos = _batch()
    fused_loss, fused_grads = _loss_and_grads(model, ids, labels, pos)
    for flag in flags:
        setattr(model.config, flag, False)
    loss, grads = _loss_and_grads(model, ids, labels, pos)
    torch.testing.assert_close(fused_loss, loss, rtol=loss_tol, atol=loss_tol)
    assert fused_grads.keys() == grads.keys()
    for name, g in grads.items():
        err = (fused_grads[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < grad_tol, (name, err.item())


@pytest.mark.gpu
@pytest.mark.parametrize("flag", ["cross_entropy_loss_fusion", "bias_activation_fusion"])
def test_fused_loss_and_swiglu_match_unfused(single_rank, flag):
    """The TE build turns both fusions on; turning one off (megatron-core reads both per call)
    changes per-token losses and gradients only by rounding."""
    model = _build(gpu_model("intra", params_dtype="bf16"), bf16=True)
    _assert_unfused_matches(model, (flag,), loss_tol=2e-3, grad_tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("experts", ["sequential", "te_grouped", "grouped"])
def test_fused_moe_router_and_permutation_match_unfused(single_rank, experts):
    """The TE build fuses the MoE router's top-k (with its aux-loss scores) and the token
    permutation; with both switched off (megatron-core reads both per call), the loss, which
    includes the aux loss, and every gradient agree. In fp32: in bf16, a token whose two best
    experts tie within rounding routes differently between the paths (seen on an H100: 5% on one
    norm's gradient with equal losses), which would hide a real difference in the noise."""
    cfg = gpu_model("intra", moe=True)
    cfg["moe"] = {**cfg["moe"], "experts": experts, "aux_loss_coeff": 1e-2}
    _assert_unfused_matches(_build(cfg), MOE_FUSION_FIELDS, loss_tol=1e-4, grad_tol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,moe", [("inter", False), ("intra", False), ("intra", True)])
def test_fused_wgrad_accumulation_matches_hook_accumulation(single_rank, kind, moe):
    """wrap_for_training(fuse_wgrad=True): TE layers add their weight gradients into DDP's fp32
    main_grad themselves. Over 3 micro-batches the buffers equal those of DDP's own hook
    accumulation (bf16 weight gradients added in fp32) within bf16 rounding: not doubled, not
    overwritten after the first micro-batch."""
    from hybrid_megatron.training.model_setup import wrap_for_training

    ids, labels, pos = _batch()
    main_grads = {}
    for fuse in (False, True):
        model = _build(gpu_model(kind, moe, params_dtype="bf16"), seed=5, bf16=True)
        (chunk,) = wrap_for_training(model, bf16=True, fuse_wgrad=fuse)
        assert model.config.gradient_accumulation_fusion is fuse
        chunk.zero_grad_buffer()
        for k in range(3):  # different tokens per micro-batch: an overwrite would show
            shift = (ids + k) % 512
            chunk(shift, pos, None, labels=(labels + k) % 512).float().mean().backward()
        main_grads[fuse] = {n: p.main_grad.float().clone() for n, p in chunk.named_parameters()}
    assert main_grads[True].keys() == main_grads[False].keys()
    for name, ref in main_grads[False].items():
        err = (main_grads[True][name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 2e-2, (name, err.item())


def test_torch_compile_compiles_in_process(monkeypatch):
    """Inductor's compile-worker pool hung our GPU processes at exit; importing the package sets
    one compile thread (environment default, and inductor's config once imported) unless the
    environment says otherwise."""
    import importlib
    import os

    from hybrid_megatron import torch_compile

    monkeypatch.delenv(torch_compile.COMPILE_THREADS_ENV, raising=False)
    torch_compile.compile_in_process()
    assert os.environ[torch_compile.COMPILE_THREADS_ENV] == "1"
    config = importlib.import_module("torch._inductor.config")
    monkeypatch.setattr(config, "compile_threads", config.compile_threads)  # restored afterwards
    torch_compile.compile_in_process()
    assert config.compile_threads == 1
    monkeypatch.setenv(torch_compile.COMPILE_THREADS_ENV, "4")
    torch_compile.compile_in_process()
    assert config.compile_threads == 4
