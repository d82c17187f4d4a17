"""The intra-layer hybrid block: every fusion / norm / scalar option trains, and a 0-width branch
reduces the block exactly to the other branch's plain block."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.conftest import build_single
from tests.model_configs import tiny_model

SEQ = 12


def _tokens(vocab=96, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, SEQ), generator=g)
    return ids, torch.arange(SEQ).expand(batch, SEQ)


@pytest.mark.parametrize(
    "fusion,norm,scalars",
    list(itertools.product(["add", "subtract", "concat"], ["none", "rmsnorm"], [False, True])),
)
def test_every_variant_runs_forward_and_backward(single_rank, fusion, norm, scalars):
    cfg = tiny_model(
        "intra",
        num_layers=2,
        pattern={"ratio": "1:0"},
        intra={"fusion": fusion, "branch_norm": norm, "branch_scalars": scalars},
    )
    model = build_single(cfg)
    ids, pos = _tokens()
    loss = model(ids, pos, None, labels=ids).mean()
    loss.backward()
    assert torch.isfinite(loss) and 3.0 < loss.item() < 6.0  # ~ln(96) at init
    mixer = model.decoder.layers[0].self_attention
    assert (mixer.attention_norm is not None) == (norm == "rmsnorm")
    assert (mixer.attention_scale is not None) == scalars
    expected_out = 128 if fusion == "concat" else 64  # mixer_width 2*hidden split 1:1
    assert mixer.out_proj.weight.shape == (64, expected_out)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


class _SilencedAttention(torch.nn.Module):
    """Wraps the attention branch and outputs zeros of its shape (isolates the Mamba branch)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        out, bias = self.inner(*args, **kwargs)
        return torch.zeros_like(out), bias


def test_subtract_is_attention_minus_mamba(single_rank):
    """Same weights (same seed): add - subtract = 2 * (the Mamba branch's contribution)."""
    x = torch.randn(SEQ, 2, 64, generator=torch.Generator().manual_seed(5))
    outs = {}
    for fusion in ("add", "subtract"):
        model = build_single(
            tiny_model(
                "intra",
                num_layers=1,
                pattern={"ratio": "1:0"},
                intra={"fusion": fusion, "branch_norm": "none"},
            ),
            seed=3,
        )
        mixer = model.decoder.layers[0].self_attention
        with torch.no_grad():
            outs[fusion] = mixer(x, attention_mask=None)[0]
            mixer.attention = _SilencedAttention(mixer.attention)
            outs[fusion + "_mamba_only"] = mixer(x, attention_mask=None)[0]
    assert outs["add_mamba_only"].abs().max() > 1e-3
    torch.testing.assert_close(outs["subtract_mamba_only"], -outs["add_mamba_only"])
    torch.testing.assert_close(
        outs["add"] - outs["subtract"], 2 * outs["add_mamba_only"], rtol=1e-5, atol=1e-5
    )


def _logits(model, ids, pos):
    with torch.no_grad():
        return model(ids, pos, None)


def test_zero_mamba_share_is_a_transformer(single_rank):
    """dim_ratio 1:0, no branch norm: the intra block is exactly a Transformer block."""
    intra = build_single(
        tiny_model(
            "intra",
            pattern={"ratio": "1:0"},
            intra={"dim_ratio": "1:0", "mixer_width": 64, "branch_norm": "none"},
        )
    )
    dense = build_single(tiny_model("transformer", attention={"num_heads": 4, "num_query_groups": 2}))
    # the intra branch uses its own num_query_groups (tiny_model sets 2)
    renamed = {}
    for key, value in dense.state_dict().items():
        key = key.replace("self_attention.linear_qkv.", "self_attention.in_proj.")
        key = key.replace("self_attention.linear_proj.", "self_attention.out_proj.")
        renamed[key] = value
    missing, unexpected = intra.load_state_dict(renamed, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")], missing
    assert not [k for k in unexpected if not k.endswith("_extra_state")], unexpected
    ids, pos = _tokens()
    torch.testing.assert_close(_logits(intra, ids, pos), _logits(dense, ids, pos), rtol=1e-6, atol=1e-6)


def test_zero_attention_share_is_a_mamba_model(single_rank):
    """dim_ratio 0:1, no branch norm: the intra block is exactly a Mamba2 block."""
    intra = build_single(
        tiny_model("intra", pattern={"ratio": "1:0"}, intra={"dim_ratio": "0:1", "branch_norm": "none"})
    )
    mamba = build_single(tiny_model("mamba"))
    renamed = {}
    for key, value in mamba.state_dict().items():
        for part in ("conv1d.", "A_log", "D", "dt_bias", "norm."):
            key = key.replace(f"self_attention.{part}", f"self_attention.mamba.{part}")
        renamed[key] = value
    missing, unexpected = intra.load_state_dict(renamed, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")], missing
    assert not [k for k in unexpected if not k.endswith("_extra_state")], unexpected
    ids, pos = _tokens()
    torch.testing.assert_close(_logits(intra, ids, pos), _logits(mamba, ids, pos), rtol=1e-6, atol=1e-6)


def test_sliding_window_limits_the_receptive_field(single_rank):
    """One SWA layer with window 4: logits at position t >= 4 ignore token 0."""
    model = build_single(tiny_model("swa", num_layers=1, attention={"sliding_window": 4}))
    ids, pos = _tokens(batch=1)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 96
    a, b = _logits(model, ids, pos), _logits(model, changed, pos)
    assert (a[0, :4] - b[0, :4]).abs().max() > 1e-4  # inside the window: token 0 matters
    torch.testing.assert_close(a[0, 4:], b[0, 4:], rtol=0, atol=1e-6)


def _sharded_norm_worker(rank: int, world: int, dtype_name: str) -> dict:
    """BranchRMSNorm on this rank's half of the channels against torch's RMSNorm of the whole
    width: output, input gradient and weight gradient (this rank's slice), and the bytes the
    norm saves for backward."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from hybrid_megatron.models.intra import BranchRMSNorm

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(3)
    width, local = 32, 16
    x = (torch.randn(6, 2, width, generator=g) * 3).to(dtype)
    weight = (1 + torch.randn(width, generator=g) / 4).to(dtype)
    dy = torch.randn(6, 2, width, generator=g).to(dtype)
    cols = slice(rank * local, (rank + 1) * local)

    full_x, full_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
    full = F.rms_norm(full_x, (width,), full_w, 1e-5)
    full.backward(dy)

    norm = BranchRMSNorm(local, width, 1e-5, dist.new_group([0, 1]), dtype)
    with torch.no_grad():
        norm.weight.copy_(weight[cols])
    part_x = x[..., cols].clone().requires_grad_()
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        part = norm(part_x)
    part.backward(dy[..., cols])

    def err(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    return {
        "y": err(part.detach(), full.detach()[..., cols]),
        "dx": err(part_x.grad, full_x.grad[..., cols]),
        "dw": err(norm.weight.grad, full_w.grad[cols]),
        "saved_bytes": sum(saved),
        "x_bytes": part_x.numel() * part_x.element_size(),
        "weight_bytes": norm.weight.numel() * norm.weight.element_size(),
        "positions": 12,
    }


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("bfloat16", 2e-2)])
def test_sharded_branch_norm_is_the_whole_width_norm_and_saves_what_the_fused_one_saves(tmp_path, dtype, tol):
    """At TP=2 the branch norm computes what torch's RMSNorm computes on the whole width, forward
    and backward, and keeps for backward only its input, its weight and one fp32 reciprocal RMS
    per position (not the fp32 copies of the elementwise formula: 5 bytes per bf16 element)."""
    from tests.distributed import run_distributed

    for r in run_distributed(_sharded_norm_worker, 2, tmp_path, dtype):
        assert max(r["y"], r["dx"], r["dw"]) < tol, r
        rstd_bytes = r["positions"] * (8 if dtype == "float64" else 4)
        assert r["saved_bytes"] == r["x_bytes"] + r["weight_bytes"] + rstd_bytes, r
