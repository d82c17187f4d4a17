"""GPU checks (H100/H200; `pytest -m gpu`): Transformer Engine builds of every kind in bf16 and
FP8, the PyTorch SSD path against mamba-ssm's Triton kernels, the MoE dispatchers against each
other, and TE against local layers on the same checkpoint."""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.model_configs import KINDS

pytestmark = pytest.mark.gpu


def gpu_model(kind: str, moe: bool = False, **overrides) -> dict:
    """A small model whose projection sizes are multiples of 16 (FP8 GEMM requirement)."""
    cfg = {
        "kind": kind,
        "impl": "te",
        "num_layers": 4,
        "hidden_size": 256,
        "ffn_hidden_size": 512,
        "vocab_size": 512,
        "max_position_embeddings": 256,
        "mamba": {"state_dim": 16, "head_dim": 16, "num_groups": 2, "chunk_size": 32},
    }
    if kind != "mamba":
        cfg["attention"] = {"num_heads": 8, "num_query_groups": 2}
    if kind == "swa":
        cfg["attention"]["sliding_window"] = 32
    if kind == "inter":
        cfg["pattern"] = {"ratio": "1:1"}
    if kind == "intra":
        cfg["intra"] = {"num_query_groups": 2, "mixer_width": 512}
    if moe:
        cfg["moe"] = {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 256}
    cfg.update(overrides)
    return cfg


def any_gpu_model(kind: str, moe: bool = False, **overrides) -> dict:
    """gpu_model, or for ``kind`` ``nemotron_h`` an inter model in flavour nemotron_h with every
    NemotronH layer letter (M, *, an A block, then - or E)."""
    if kind != "nemotron_h":
        return gpu_model(kind, moe, **overrides)
    layout = "M*A" + ("E" if moe else "-")
    return gpu_model(
        "inter",
        moe,
        flavour="nemotron_h",
        pattern={"layout": layout, "allow_early_attention": True},
        **overrides,
    )


def _build(cfg: dict, seed: int = 1, bf16: bool = False):
    from hybrid_megatron.config.model import ModelConfig
    from hybrid_megatron.config.parallel import ParallelConfig
    from hybrid_megatron.models import build_model
    from hybrid_megatron.training.parallel_setup import setup_model_parallel

    setup_model_parallel(ParallelConfig(), seed=seed)
    return build_model(ModelConfig(**cfg), bf16=bf16).cuda()


def _batch(vocab=512, batch=2, seq=128):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g).cuda()
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), torch.arange(seq).cuda().expand(batch, seq)


def _train_losses(model, steps: int) -> list[float]:
    """The losses of ``steps`` AdamW steps (lr 1e-3) on ``_batch()``: the FP8 tests' short run."""
    ids, labels, pos = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(ids, pos, None, labels=labels).float().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("kind", KINDS + ["nemotron_h"])
def test_te_bf16_forward_backward(single_rank, kind, moe):
    model = _build(any_gpu_model(kind, moe, params_dtype="bf16"), bf16=True)
    ids, labels, pos = _batch()
    loss = model(ids, pos, None, labels=labels).float().mean()
    loss.backward()
    assert torch.isfinite(loss) and 4.0 < loss.item() < 9.0  # ~ln(512) at init
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kind", KINDS)
def test_te_fp8_forward_backward(single_rank, kind):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 needs Hopper or newer")
    model = _build(gpu_model(kind, params_dtype="bf16", fp8="hybrid"), bf16=True)
    losses = _train_losses(model, 3)  # a few steps so the delayed-scaling amax history is exercised
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("kind", ["transformer", "inter", "intra"])
def test_fp8_attention_trains_like_bf16_attention(single_rank, kind):
    """model.fp8_attention: TE's cuDNN FP8 attention (head size 128) starts from the same loss as
    FP8 GEMMs with bf16 attention, within FP8 error, and trains."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 attention needs Hopper or newer")
    attention = {"num_heads": 2, "num_query_groups": 2}  # head size 256/2 = 128
    losses = {}
    for fp8_attention in (False, True):
        model = _build(
            gpu_model(
                kind, params_dtype="bf16", fp8="hybrid", attention=attention, fp8_attention=fp8_attention
            ),
            bf16=True,
        )
        losses[fp8_attention] = _train_losses(model, 4)
    assert all(torch.isfinite(torch.tensor(losses[True]))), losses
    assert losses[True][0] == pytest.approx(losses[False][0], rel=2e-2), losses
    assert losses[True][-1] < losses[True][0], losses


def test_fp8_output_layer_trains_like_the_bf16_head(single_rank):
    """model.fp8_output_layer: the LM head becomes a TE layer that starts from the same weight as
    megatron-core's bf16 head, runs in FP8 (TE's ``fp8`` flag is set by its forward), starts
    from the same loss within FP8 error and trains."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 needs Hopper or newer")
    losses, heads, initial = {}, {}, {}
    for fp8_head in (False, True):
        model = _build(
            gpu_model("inter", params_dtype="bf16", fp8="hybrid", fp8_output_layer=fp8_head), bf16=True
        )
        heads[fp8_head] = model.output_layer
        initial[fp8_head] = model.output_layer.weight.detach().clone()
        losses[fp8_head] = _train_losses(model, 4)
    assert torch.equal(initial[True], initial[False])
    assert type(heads[True]).__name__ == "FP8OutputLayer" and heads[True].fp8
    assert type(heads[False]).__name__ == "ColumnParallelLinear"
    assert all(torch.isfinite(torch.tensor(losses[True]))), losses
    assert losses[True][0] == pytest.approx(losses[False][0], rel=2e-2), losses
    assert losses[True][-1] < losses[True][0], losses


def _ssd_inputs(dtype, b=2, L=200, h=8, p=32, g=2, n=16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    return dict(
        x=r(b, L, h, p).to(dtype),
        dt=r(b, L, h).to(dtype),
        A=-torch.rand(h, device="cuda", generator=gen) * 4 - 0.5,
        B=r(b, L, g, n).to(dtype),
        C=r(b, L, g, n).to(dtype),
        D=r(h),
        z=r(b, L, h, p).to(dtype),
        dt_bias=r(h) * 0.5,
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 5e-2)])
def test_torch_ssd_matches_triton_kernel(dtype, tol):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as triton_ssd

    from hybrid_megatron import ops

    inp = _ssd_inputs(dtype)
    kw = dict(chunk_size=64, dt_softplus=True, return_final_states=True)
    y_ref, s_ref = triton_ssd(**inp, **kw)
    y, s = ops.mamba_chunk_scan_combined(**inp, **kw)
    scale = y_ref.float().abs().max()
    assert (y.float() - y_ref.float()).abs().max() / scale < tol
    assert (s.float() - s_ref.float()).abs().max() / s_ref.float().abs().max() < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 5e-2)])
def test_torch_split_conv1d_scan_matches_triton(dtype, tol):
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined as triton_fn

    from hybrid_megatron import ops

    b, L, h, p, g, n, w = 2, 160, 8, 32, 2, 16, 4
    d = h * p
    gen = torch.Generator(device="cuda").manual_seed(1)
    zxbcdt = torch.randn(b, L, 2 * d + 2 * g * n + h, device="cuda", generator=gen).to(dtype)
    conv_w = torch.randn(d + 2 * g * n, w, device="cuda", generator=gen).to(dtype) * 0.3
    conv_b = torch.randn(d + 2 * g * n, device="cuda", generator=gen).to(dtype) * 0.1
    dt_bias = torch.randn(h, device="cuda", generator=gen) * 0.5
    A = -torch.rand(h, device="cuda", generator=gen) * 4 - 0.5
    D = torch.randn(h, device="cuda", generator=gen)
    args = (zxbcdt, conv_w, conv_b, dt_bias, A, D, 64)
    kw = dict(activation="silu", headdim=p, ngroups=g, norm_before_gate=False)
    zxbcdt_ref = zxbcdt.clone().requires_grad_()
    zxbcdt_ours = zxbcdt.clone().requires_grad_()
    y_ref = triton_fn(zxbcdt_ref, *args[1:], **kw)
    y = ops.mamba_split_conv1d_scan_combined(zxbcdt_ours, *args[1:], **kw)
    scale = y_ref.float().abs().max()
    assert (y.float() - y_ref.float()).abs().max() / scale < tol
    y_ref.float().pow(2).mean().backward()
    y.float().pow(2).mean().backward()
    gscale = zxbcdt_ref.grad.float().abs().max()
    assert (zxbcdt_ours.grad.float() - zxbcdt_ref.grad.float()).abs().max() / gscale < 5 * tol


def test_torch_conv1d_and_decode_match_kernels():
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    from hybrid_megatron import ops

    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(2, 96, 50, device="cuda", generator=gen)
    w = torch.randn(96, 4, device="cuda", generator=gen)
    bias = torch.randn(96, device="cuda", generator=gen)
    torch.testing.assert_close(
        ops.causal_conv1d_fn(x, w, bias, activation="silu"),
        causal_conv1d_fn(x, w, bias, activation="silu"),
        rtol=1e-4,
        atol=1e-4,
    )
    b, h, p, n = 2, 8, 32, 16
    state = torch.randn(b, h, p, n, device="cuda", generator=gen)
    xs = torch.randn(b, h, p, device="cuda", generator=gen)
    dt = torch.randn(b, h, p, device="cuda", generator=gen)
    A = -torch.rand(h, p, n, device="cuda", generator=gen)
    Bm = torch.randn(b, h, n, device="cuda", generator=gen)
    Cm = torch.randn(b, h, n, device="cuda", generator=gen)
    D = torch.randn(h, p, device="cuda", generator=gen)
    dt_bias = torch.randn(h, p, device="cuda", generator=gen)
    s1, s2 = state.clone(), state.clone()
    out_ref = selective_state_update(s1, xs, dt, A, Bm, Cm, D=D, dt_bias=dt_bias, dt_softplus=True)
    out = ops.selective_state_update(s2, xs, dt, A, Bm, Cm, D=D, dt_bias=dt_bias, dt_softplus=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(s2, s1, rtol=1e-3, atol=1e-3)


def test_mamba_model_same_with_kernels_and_torch_path(single_rank, monkeypatch):
    """The whole mamba model: megatron-core's MambaMixer on Triton kernels vs on the torch SSD."""
    from megatron.core.ssm import mamba_mixer

    from hybrid_megatron import ops

    cfg = gpu_model("mamba")
    ids, labels, pos = _batch()
    model = _build(cfg, seed=5)
    with torch.no_grad():
        ref = model(ids, pos, None).float()
    for name in ("mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined", "causal_conv1d_fn"):
        monkeypatch.setattr(mamba_mixer, name, getattr(ops, name))
    with torch.no_grad():
        ours = model(ids, pos, None).float()
    assert (ours - ref).abs().max() / ref.abs().max() < 2e-3


def test_grouped_experts_on_gpu_match_a_loop_over_experts(single_rank):
    """GroupedExperts in bf16 on the GPU (groups padded to 16 rows, one expert with no token)
    against each expert's own matmuls in fp32: outputs and every gradient."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from hybrid_megatron.config.model import ModelConfig
    from hybrid_megatron.models.moe import GroupedExperts, group_alignment
    from hybrid_megatron.models.transformer_config import build_transformer_config

    cfg = gpu_model("intra", moe=True, params_dtype="bf16")
    tconfig = build_transformer_config(ModelConfig(**cfg), bf16=True)
    experts = GroupedExperts(4, tconfig, get_default_pg_collection()).cuda()
    assert group_alignment(torch.device("cuda")) == 16
    counts = torch.tensor([37, 0, 5, 86], device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randn(128, 256, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    probs = torch.rand(128, device="cuda", generator=g, requires_grad=True)
    out, _ = experts(tokens, counts, probs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    w1 = experts.weight1.detach().float().requires_grad_()
    w2 = experts.weight2.detach().float().requires_grad_()
    x, p = tokens.detach().float().requires_grad_(), probs.detach().requires_grad_()
    pieces, start = [], 0
    for e, n in enumerate(counts.tolist()):
        h = x[start : start + n] @ w1[e].T
        gate, linear = h.chunk(2, dim=-1)
        pieces.append((torch.nn.functional.silu(gate) * linear * p[start : start + n, None]) @ w2[e].T)
        start += n
    ref = torch.cat(pieces)
    ref.backward(grad_out.float())
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    for got, want in (
        (tokens.grad, x.grad),
        (probs.grad, p.grad),
        (experts.weight1.grad, w1.grad),
        (experts.weight2.grad, w2.grad),
    ):
        err = (got.float() - want).norm() / want.norm()
        assert err < 2e-2, err.item()
    assert experts.weight1.grad[1].abs().max() == 0  # the expert without tokens learns nothing


def test_grouped_experts_train_like_sequential_on_gpu(single_rank, monkeypatch):
    """fp32 on the GPU, the same initial weights: 20 AdamW steps of the intra MoE model with the
    grouped experts (all-to-all dispatcher, counts on the device) give the sequential experts'
    losses. Local (torch) layers with TF32 off, so that both sides multiply in full fp32
    (Transformer Engine's fp32 GEMMs may use TF32 whatever torch's switch says)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    losses = {}
    reference = None
    for experts in ("sequential", "grouped"):
        cfg = gpu_model("intra", moe=True, impl="local")
        cfg["moe"] = {**cfg["moe"], "experts": experts}
        model = _build(cfg, seed=4)
        if reference is None:
            reference = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        else:
            missing, unexpected = model.load_state_dict(reference, strict=False)
            assert not unexpected and not [k for k in missing if not k.endswith("_extra_state")]
        losses[experts] = _train_losses(model, 20)
    assert losses["grouped"][0] == pytest.approx(losses["sequential"][0], rel=1e-6), losses
    assert losses["grouped"] == pytest.approx(losses["sequential"], rel=1e-4), losses
    assert losses["grouped"][-1] < losses["grouped"][0] - 1.0


def test_moe_alltoall_matches_allgather(single_rank):
    outs = {}
    ids, labels, pos = _batch()
    for dispatcher in ("alltoall", "allgather"):
        cfg = gpu_model("transformer", moe=True)
        cfg["moe"] = {**cfg["moe"], "token_dispatcher": dispatcher}
        model = _build(cfg, seed=9)
        with torch.no_grad():
            outs[dispatcher] = model(ids, pos, None).float()
    torch.testing.assert_close(outs["alltoall"], outs["allgather"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS + ["nemotron_h"])
def test_te_and_local_agree_on_one_checkpoint(single_rank, kind, tmp_path):
    """Checkpoint keys are implementation-independent: local weights load into TE layers."""
    from megatron.core import dist_checkpointing

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    ids, labels, pos = _batch()
    local = _build(any_gpu_model(kind, kind == "nemotron_h", impl="local"), seed=3)
    with torch.no_grad():
        ref = local(ids, pos, None).float()
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(local.sharded_state_dict(), str(tmp_path / "ckpt"))
    te_model = _build(any_gpu_model(kind, kind == "nemotron_h"), seed=4)
    # TE layers carry FP8 metadata (_extra_state) that local layers do not have.
    wanted = {k: v for k, v in te_model.sharded_state_dict().items() if not k.endswith("_extra_state")}
    loaded = dist_checkpointing.load(wanted, str(tmp_path / "ckpt"))
    missing, unexpected = te_model.load_state_dict(loaded, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")], missing
    assert not unexpected, unexpected
    with torch.no_grad():
        out = te_model(ids, pos, None).float()
    assert (out - ref).abs().max() / ref.abs().max() < 1e-3


@pytest.mark.parametrize("fp8", [False, True, "head_on_resume"], ids=["bf16", "fp8", "fp8_head_on_resume"])
def test_trainer_on_gpu_learns_and_checkpoints(tmp_path, fp8):
    """The real trainer (one rank, nccl) on the tiny intra MoE recipe with Transformer Engine in
    bf16 (and FP8): the loss falls, validation runs, a checkpoint is saved and a longer run
    resumes from it; with ``head_on_resume`` the resumed run turns model.fp8_output_layer on
    (its checkpoint has no FP8 state for the head yet)."""
    import json

    from tests.training_helpers import REPO, start_job, wait_job

    run_dir = tmp_path / "run"
    overrides = [
        f"checkpoint.dir={run_dir}/checkpoints",
        "tracking.enabled=false",  # no MLflow on the GPU box
        "model.impl=te",
        "parallel.tp=1",
        "parallel.sequence_parallel=false",
        "train.precision=bf16",
        "train.steps=40",
        "train.eval_interval=20",
        "checkpoint.interval=20",
        "train.log_interval=10",
        # FP8 GEMMs need the Mamba in-projection width in multiples of 16 (8-channel SSM heads).
        "model.mamba.head_dim=8",
        *(["model.fp8=hybrid"] if fp8 else []),
    ]
    procs = start_job(str(REPO / "recipes/intra_tiny_moe.yaml"), overrides, 1, tmp_path / "logs")
    codes = wait_job(procs, timeout=600)
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert codes == [0], log[-3000:]
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [float.fromhex(r["loss"]) for r in records]
    assert len(losses) == 40 and all(map(lambda x: x == x, losses))
    # The tiny corpus is learnable: 40 steps at lr 3e-3 drop the loss well below ln(4096)=8.3.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert "validation loss" in log
    assert (run_dir / "checkpoints" / "step_00000040").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip().endswith("step_00000040")
    longer = [o.replace("train.steps=40", "train.steps=44") for o in overrides]
    if fp8 == "head_on_resume":
        longer.append("model.fp8_output_layer=true")
    codes = wait_job(
        start_job(str(REPO / "recipes/intra_tiny_moe.yaml"), longer, 1, tmp_path / "logs2"), timeout=600
    )
    resumed = (tmp_path / "logs2" / "rank0.log").read_text()
    assert codes == [0], resumed[-3000:]
    assert "at step 40" in resumed, resumed[-3000:]
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 45))
    resumed_losses = [float.fromhex(r["loss"]) for r in records[40:]]
    # The resumed steps continue the curve (an FP8 head switched on included): no jump back.
    assert max(resumed_losses) < sum(losses[:5]) / 5 - 1.0, (losses, resumed_losses)


def test_fp8_grouped_gemm_kernel_matches_its_reference():
    """torch._scaled_grouped_mm on the GPU against the float32 reference of the same E4M3
    operands (forward, input and weight gradients; the torch quantiser on both devices),
    groups padded to 16, one group empty."""
    from hybrid_megatron.ops import fp8_grouped_mm as f8

    g = torch.Generator(device="cuda").manual_seed(0)
    offsets = torch.tensor([48, 48, 96, 160], device="cuda", dtype=torch.int32)
    x = torch.randn(176, 256, device="cuda", generator=g, dtype=torch.bfloat16)  # 16 padding rows
    w = torch.randn(4, 512, 256, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    grad = torch.randn(176, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    results = {}
    for device in ("cuda", "cpu"):
        xs, ws = x.detach().to(device).requires_grad_(), w.detach().to(device).requires_grad_()
        y = f8.fp8_grouped_linear(xs, ws, offsets.to(device), quantiser=f8.TorchQuantiser())
        y.backward(grad.to(device))
        results[device] = [
            t.float().cpu()[:160] if t.dim() == 2 else t.float().cpu() for t in (y, xs.grad, ws.grad)
        ]
    for got, want in zip(results["cuda"], results["cpu"], strict=True):
        err = (got - want).norm() / want.norm()
        assert err < 1e-2, err.item()
    assert results["cuda"][2][1].abs().max() == 0


def test_fp8_grouped_experts_on_gpu_track_bf16(single_rank):
    """GroupedExperts under an FP8 config on the GPU: outputs and gradients within E4M3
    rounding of the same experts in bf16; the expert without tokens gets zero weight gradients
    (no masking pass: the padded layout gives it zero rows)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from hybrid_megatron.config.model import ModelConfig
    from hybrid_megatron.models.moe import GroupedExperts
    from hybrid_megatron.models.transformer_config import build_transformer_config

    cfg = gpu_model("intra", moe=True, params_dtype="bf16")
    tconfig = build_transformer_config(ModelConfig(**cfg), bf16=True)
    experts = GroupedExperts(4, tconfig, get_default_pg_collection()).cuda()
    counts = torch.tensor([37, 0, 5, 86], device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randn(128, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    probs = torch.rand(128, device="cuda", generator=g)
    grad_out = torch.randn(128, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    results = []
    for fp8 in (False, True):
        experts.fp8 = fp8
        experts.zero_grad()
        x = tokens.clone().requires_grad_()
        out, _ = experts(x, counts, probs)
        out.backward(grad_out)
        results.append(
            [out.float(), x.grad.float(), experts.weight1.grad.float(), experts.weight2.grad.float()]
        )
    for bf16, fp8 in zip(*results, strict=True):
        err = (fp8 - bf16).norm() / bf16.norm()
        assert 1e-4 < err < 0.1, err.item()
    # expert 1 got no tokens: its block of zero padding rows gives exactly zero weight gradients
    for weight_grad in results[1][2:]:
        assert torch.isfinite(weight_grad).all() and not weight_grad[1].any()


def _skip_without_te_fp8():
    from hybrid_megatron.ops.fp8_grouped_mm import have_transformer_engine

    if not have_transformer_engine():
        pytest.skip("needs Transformer Engine")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 needs Hopper or newer")


def test_te_quantiser_writes_the_per_tensor_reference_bytes():
    """TE's fused quantiser (current scaling, power-of-two scale) writes the bytes of the torch
    per-tensor reference, its transposed copy is their transpose, and the scales are that one
    scale repeated per row; an all-zero tensor gets zeros and scale 1."""
    from hybrid_megatron.ops import fp8_grouped_mm as f8
    from tests.test_ops_fp8_grouped_mm import TensorwiseQuantiser

    _skip_without_te_fp8()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(176, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    x[:16] *= 1e-3  # rows far below the tensor's largest: some in E4M3's subnormal range
    for t in (x, torch.zeros_like(x)):
        te = f8.TEQuantiser()(t, rowwise=True, columnwise=True)
        ref = TensorwiseQuantiser()(t, rowwise=True, columnwise=True)
        assert te.rowwise.dtype == te.columnwise.dtype == f8.E4M3
        assert te.rowwise.shape == (176, 256) and te.columnwise.shape == (256, 176)
        assert te.rowwise.is_contiguous() and te.columnwise.is_contiguous()
        assert torch.equal(te.rowwise.view(torch.uint8), ref.rowwise.view(torch.uint8))
        assert torch.equal(te.columnwise.view(torch.uint8), te.rowwise.view(torch.uint8).t())
        for scale_inv, n in ((te.rowwise_scale_inv, 176), (te.columnwise_scale_inv, 256)):
            assert scale_inv.dtype == torch.float32 and scale_inv.shape == (n,)
            assert scale_inv.is_contiguous()
            want = ref.rowwise_scale_inv[0] if t.any() else 1.0
            assert torch.all(scale_inv == want), (scale_inv[0].item(), want)
    only_rows = f8.TEQuantiser()(x, rowwise=True, columnwise=False)
    assert only_rows.columnwise is None and only_rows.columnwise_scale_inv is None


def test_te_quantiser_tracks_the_torch_quantiser():
    """The grouped linear's output and its input and weight gradients with TE's quantiser
    within 1% of the torch quantiser's (power-of-two scales: per tensor and per row round the
    same except in E4M3's subnormal range), one group empty (zero weight gradient), also for
    an all-zero input and an all-zero output gradient."""
    from hybrid_megatron.ops import fp8_grouped_mm as f8

    _skip_without_te_fp8()
    g = torch.Generator(device="cuda").manual_seed(0)
    offsets = torch.tensor([48, 48, 96, 160], device="cuda", dtype=torch.int32)
    x = torch.randn(176, 256, device="cuda", generator=g, dtype=torch.bfloat16)  # 16 padding rows
    w = torch.randn(4, 512, 256, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    grad = torch.randn(176, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    cases = {"random": (x, grad), "zero input": (x * 0, grad), "zero gradient": (x, grad * 0)}
    for case, (x_in, grad_in) in cases.items():
        results = []
        for quantiser in (f8.TorchQuantiser(), f8.TEQuantiser()):
            xs, ws = x_in.clone().requires_grad_(), w.clone().requires_grad_()
            y = f8.fp8_grouped_linear(xs, ws, offsets, quantiser=quantiser)
            y.backward(grad_in)
            # rows past the last group are not written by the kernel
            results.append([y.float()[:160], xs.grad.float()[:160], ws.grad.float()])
        for name, want, got in zip(("output", "input grad", "weight grad"), *results, strict=True):
            assert torch.isfinite(got).all(), (case, name)
            if want.any():
                err = (got - want).norm() / want.norm()
                assert err < 1e-2, (case, name, err.item())
            else:
                assert not got.any(), (case, name)
        assert not results[1][2][1].any(), case  # the empty group's weight gradient


def test_fp8_grouped_experts_train_with_te_quantiser(single_rank, monkeypatch):
    """GroupedExperts under FP8 on the GPU quantise through TE by default and fit a target
    like the same experts in bf16: losses finite, falling, within 5% of bf16's every step."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from hybrid_megatron.config.model import ModelConfig
    from hybrid_megatron.models.moe import GroupedExperts
    from hybrid_megatron.models.transformer_config import build_transformer_config
    from hybrid_megatron.ops import fp8_grouped_mm as f8

    _skip_without_te_fp8()
    calls = []
    te_call = f8.TEQuantiser.__call__
    monkeypatch.setattr(
        f8.TEQuantiser, "__call__", lambda self, x, **kw: calls.append(x.shape) or te_call(self, x, **kw)
    )
    cfg = gpu_model("intra", moe=True, params_dtype="bf16")
    tconfig = build_transformer_config(ModelConfig(**cfg), bf16=True)
    initial = GroupedExperts(4, tconfig, get_default_pg_collection()).cuda().state_dict()
    counts = torch.tensor([37, 0, 5, 86], device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randn(128, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    probs = torch.rand(128, device="cuda", generator=g)
    target = torch.randn(128, 256, device="cuda", generator=g)
    losses: dict[bool, list[float]] = {}
    scale = None  # the target at the bf16 outputs' initial size
    for fp8 in (False, True):
        experts = GroupedExperts(4, tconfig, get_default_pg_collection()).cuda()
        experts.load_state_dict(initial)
        experts.fp8 = fp8
        optimizer = torch.optim.Adam(experts.parameters(), lr=1e-3)
        losses[fp8] = []
        for _ in range(8):
            optimizer.zero_grad()
            out, _ = experts(tokens, counts, probs)
            if scale is None:
                scale = out.float().std().item()
            loss = (out.float() - target * scale).pow(2).mean() / scale**2
            loss.backward()
            optimizer.step()
            losses[fp8].append(loss.item())
    fp8_losses = losses[True]
    assert len(calls) == 8 * 2 * 2, len(calls)  # x and the gradient of both layers, every step
    assert all(math.isfinite(v) for v in fp8_losses), fp8_losses
    assert all(b < a for a, b in zip(fp8_losses, fp8_losses[1:])), fp8_losses
    assert fp8_losses[-1] < 0.5 * fp8_losses[0], fp8_losses
    for a, b in zip(fp8_losses, losses[False], strict=True):
        assert a == pytest.approx(b, rel=0.05), (fp8_losses, losses[False])
