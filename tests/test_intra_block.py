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
