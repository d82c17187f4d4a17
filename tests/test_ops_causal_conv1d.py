"""Tests of the causal depthwise conv ops against ``F.conv1d``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_megatron import ops
from tests.ops_helpers import F64, TOL, ref_conv


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_causal_conv1d_fn_matches_conv1d(activation, with_bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 13, generator=gen, dtype=F64)
    w = torch.randn(6, 4, generator=gen, dtype=F64)
    bias = torch.randn(6, generator=gen, dtype=F64) if with_bias else None
    out = ops.causal_conv1d_fn(x, w, bias, activation=activation)
    assert (out - ref_conv(x, w, bias, activation)).abs().max().item() < TOL

    # initial_states are the inputs preceding x; final states are the last width-1 inputs
    init = torch.randn(2, 6, 3, generator=gen, dtype=F64)
    out_i, fin = ops.causal_conv1d_fn(
        x, w, bias, initial_states=init, return_final_states=True, activation=activation
    )
    ref_i = ref_conv(torch.cat([init, x], -1), w, bias, activation)[..., 3:]
    assert (out_i - ref_i).abs().max().item() < TOL
    assert torch.equal(fin, x[..., -3:])
    buf = torch.zeros(2, 6, 3, dtype=F64)
    _, fin_buf = ops.causal_conv1d_fn(
        x[..., :2], w, bias, initial_states=init, return_final_states=True, final_states_out=buf
    )
    assert fin_buf is buf and torch.equal(buf, torch.cat([init[..., -1:], x[..., :2]], -1))


def test_causal_conv1d_fn_seq_idx_and_dtype():
    gen = torch.Generator().manual_seed(2)
    lengths = [3, 1, 7, 5]
    x = torch.randn(1, 5, sum(lengths), generator=gen, dtype=F64)
    w = torch.randn(5, 4, generator=gen, dtype=F64)
    bias = torch.randn(5, generator=gen, dtype=F64)
    seq = torch.cat([torch.full((m,), i, dtype=torch.int32) for i, m in enumerate(lengths)])[None]
    out = ops.causal_conv1d_fn(x, w, bias, seq_idx=seq, activation="silu")
    ref = torch.cat([ref_conv(p, w, bias, "silu") for p in x.split(lengths, -1)], -1)
    assert (out - ref).abs().max().item() < TOL
    seq_pad = seq.clone()
    seq_pad[0, -2:] = -1  # padding tokens produce zeros
    out_pad = ops.causal_conv1d_fn(x, w, bias, seq_idx=seq_pad, activation="silu")
    assert torch.all(out_pad[..., -2:] == 0)
    assert (out_pad[..., :-2] - ref[..., :-2]).abs().max().item() < TOL
    with pytest.raises(ValueError):
        ops.causal_conv1d_fn(x, w, bias, seq_idx=seq, return_final_states=True)

    xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
    outb = ops.causal_conv1d_fn(xb, wb, None, activation="silu")
    assert outb.dtype == torch.bfloat16
    refb = ref_conv(xb.double(), wb.double(), None, "silu")
    assert (outb.double() - refb).abs().max().item() < 3e-2 * refb.abs().max().item()


def test_causal_conv1d_update_circular_buffer_matches_shift_buffer():
    gen = torch.Generator().manual_seed(4)
    b, d, w, l = 2, 3, 4, 9
    x = torch.randn(b, d, l, generator=gen, dtype=F64)
    wt = torch.randn(d, w, generator=gen, dtype=F64)
    shift_state = torch.zeros(b, d, w - 1, dtype=F64)
    ring = torch.zeros(b, d, 5, dtype=F64)
    for t in range(l):
        a = ops.causal_conv1d_update(x[:, :, t], shift_state, wt, None, "silu")
        c = ops.causal_conv1d_update(
            x[:, :, t],
            ring,
            wt,
            None,
            "silu",
            cache_seqlens=torch.full((b,), t, dtype=torch.int32),
        )
        assert (a - c).abs().max().item() < TOL
    ref = ref_conv(x, wt, None, "silu")[..., -1]
    assert (a - ref).abs().max().item() < TOL
    # several tokens at once give the same as token by token
    state2 = torch.zeros(b, d, w - 1, dtype=F64)
    multi = ops.causal_conv1d_update(x, state2, wt, None, "silu")
    assert (multi - ref_conv(x, wt, None, "silu")).abs().max().item() < TOL
    assert torch.equal(state2, shift_state)


def test_causal_conv1d_varlen_states():
    gen = torch.Generator().manual_seed(6)
    lengths = [5, 2, 9]
    x = torch.randn(sum(lengths), 4, generator=gen, dtype=F64)
    cu = torch.tensor([0, 5, 7, 16], dtype=torch.int32)
    states = ops.causal_conv1d_varlen_states(x, cu, state_len=4)
    assert states.shape == (3, 4, 4)
    for i in range(3):
        seq = x[cu[i] : cu[i + 1]].T
        want = F.pad(seq, (4 - seq.shape[-1], 0))[..., -4:]
        assert torch.equal(states[i], want)
