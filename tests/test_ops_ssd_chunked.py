"""Tests of the chunked SSD scan (``mamba_chunk_scan_combined``): forward and backward against the
token-by-token recurrence, and against the quadratic-form reference ``ssd_minimal``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_megatron import ops
from tests.ops_helpers import F64, TOL, make_ssd_inputs, naive_ssd

# ----------------------------------------------------------------------------------------------
# mamba_chunk_scan_combined: forward
# ----------------------------------------------------------------------------------------------

SHAPES = [
    # b, l, h, p, g, n, chunk
    pytest.param(2, 64, 4, 8, 1, 16, 16, id="L_multiple_of_chunk"),
    pytest.param(1, 50, 6, 4, 3, 8, 16, id="ngroups3_L_not_multiple"),
    pytest.param(2, 37, 4, 4, 2, 5, 8, id="ngroups2_odd_dstate"),
    pytest.param(1, 5, 2, 3, 1, 4, 16, id="L_shorter_than_chunk"),
    pytest.param(2, 19, 4, 2, 4, 3, 1, id="chunk1_ngroups_eq_nheads"),
]


@pytest.mark.parametrize("b,l,h,p,g,n,chunk", SHAPES)
@pytest.mark.parametrize("with_dz", [False, True], ids=["plain", "D_z_bias_softplus"])
def test_chunked_ssd_matches_recurrence(b, l, h, p, g, n, chunk, with_dz):
    t = make_ssd_inputs(b, l, h, p, g, n)
    if with_dz:
        kw = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
        dt_ref = F.softplus(t["dt_raw"] + t["dt_bias"])
        ref, _ = naive_ssd(t["x"], dt_ref, t["A"], t["B"], t["C"], D=t["D"], z=t["z"])
        dt_in = t["dt_raw"]
    else:
        kw = {}
        dt_in = F.softplus(t["dt_raw"])
        ref, _ = naive_ssd(t["x"], dt_in, t["A"], t["B"], t["C"])
    out = ops.mamba_chunk_scan_combined(t["x"], dt_in, t["A"], t["B"], t["C"], chunk, **kw)
    assert out.shape == (b, l, h, p) and out.dtype == F64
    assert (out - ref).abs().max().item() < TOL


def test_D_per_head_and_dt_limit_clamp():
    t = make_ssd_inputs(2, 30, 4, 3, 2, 4)
    limit = (0.2, 0.6)
    dt_ref = F.softplus(t["dt_raw"] + t["dt_bias"]).clamp(*limit)
    ref, _ = naive_ssd(t["x"], dt_ref, t["A"], t["B"], t["C"], D=t["D1"], z=t["z"])
    args = (t["x"], t["dt_raw"], t["A"], t["B"], t["C"], 8)
    kw = dict(D=t["D1"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
    out = ops.mamba_chunk_scan_combined(*args, dt_limit=limit, **kw)
    assert (out - ref).abs().max().item() < TOL
    # the clamp is active on this data, so dropping it must change the result
    unclamped = ops.mamba_chunk_scan_combined(*args, **kw)
    assert (unclamped - ref).abs().max().item() > 1e-3


def test_initial_and_final_states_and_split_prefill():
    b, l, h, p, g, n = 2, 45, 4, 4, 2, 6
    t = make_ssd_inputs(b, l, h, p, g, n)
    dt = F.softplus(t["dt_raw"])
    ref, ref_final = naive_ssd(t["x"], dt, t["A"], t["B"], t["C"], D=t["D"], initial_states=t["init"])
    out, final = ops.mamba_chunk_scan_combined(
        t["x"],
        dt,
        t["A"],
        t["B"],
        t["C"],
        16,
        D=t["D"],
        initial_states=t["init"],
        return_final_states=True,
    )
    assert final.shape == (b, h, p, n)
    assert (out - ref).abs().max().item() < TOL
    assert (final - ref_final).abs().max().item() < TOL

    # chunked prefill: the final state of the first part seeds the second part
    k = 19
    out1, mid = ops.mamba_chunk_scan_combined(
        t["x"][:, :k],
        dt[:, :k],
        t["A"],
        t["B"][:, :k],
        t["C"][:, :k],
        16,
        D=t["D"],
        initial_states=t["init"],
        return_final_states=True,
    )
    out2, final2 = ops.mamba_chunk_scan_combined(
        t["x"][:, k:],
        dt[:, k:],
        t["A"],
        t["B"][:, k:],
        t["C"][:, k:],
        16,
        D=t["D"],
        initial_states=mid,
        return_final_states=True,
    )
    assert (torch.cat([out1, out2], dim=1) - ref).abs().max().item() < TOL
    assert (final2 - ref_final).abs().max().item() < TOL


def test_chunk_size_invariance():
    t = make_ssd_inputs(1, 70, 4, 4, 2, 8)
    outs, finals = [], []
    for chunk in (1, 3, 8, 16, 64, 128):
        out, final = ops.mamba_chunk_scan_combined(
            t["x"],
            t["dt_raw"],
            t["A"],
            t["B"],
            t["C"],
            chunk,
            D=t["D"],
            z=t["z"],
            dt_bias=t["dt_bias"],
            dt_softplus=True,
            initial_states=t["init"],
            return_final_states=True,
        )
        outs.append(out)
        finals.append(final)
    for out, final in zip(outs[1:], finals[1:]):
        assert (out - outs[0]).abs().max().item() < 1e-11
        assert (final - finals[0]).abs().max().item() < 1e-11


def _packed_seq_idx():
    # boundaries inside chunks, on a chunk edge (16), a sequence wholly inside one chunk
    # (ids 2 and 3), and one spanning more than two chunks (id 4), with chunk_size 8
    lengths = [5, 11, 3, 2, 19, 6]
    seq = torch.cat([torch.full((m,), i, dtype=torch.int32) for i, m in enumerate(lengths)])
    return seq.unsqueeze(0), lengths


def test_seq_idx_isolates_packed_sequences():
    seq_idx, lengths = _packed_seq_idx()
    l = seq_idx.shape[1]
    t = make_ssd_inputs(1, l, 4, 3, 2, 5)
    dt = F.softplus(t["dt_raw"])
    init = t["init"][:1]
    out, final = ops.mamba_chunk_scan_combined(
        t["x"],
        dt,
        t["A"],
        t["B"],
        t["C"],
        8,
        D=t["D"],
        z=t["z"],
        initial_states=init,
        seq_idx=seq_idx,
        return_final_states=True,
    )
    ref, ref_final = naive_ssd(
        t["x"], dt, t["A"], t["B"], t["C"], D=t["D"], z=t["z"], initial_states=init, seq_idx=seq_idx
    )
    assert (out - ref).abs().max().item() < TOL
    assert (final - ref_final).abs().max().item() < TOL

    # same thing as running every sequence on its own (only the first sees initial_states)
    start, pieces = 0, []
    for i, m in enumerate(lengths):
        sl = slice(start, start + m)
        piece, piece_final = naive_ssd(
            t["x"][:, sl],
            dt[:, sl],
            t["A"],
            t["B"][:, sl],
            t["C"][:, sl],
            D=t["D"],
            z=t["z"][:, sl],
            initial_states=init if i == 0 else None,
        )
        pieces.append(piece)
        start += m
    assert (out - torch.cat(pieces, dim=1)).abs().max().item() < TOL
    assert (final - piece_final).abs().max().item() < TOL
    # without seq_idx the state leaks across boundaries: the test above can fail
    leaky = ops.mamba_chunk_scan_combined(
        t["x"], dt, t["A"], t["B"], t["C"], 8, D=t["D"], z=t["z"], initial_states=init
    )
    assert (leaky - ref).abs().max().item() > 1e-3


def test_varlen_states_are_per_sequence_final_states():
    seq_idx, lengths = _packed_seq_idx()
    l = seq_idx.shape[1]
    t = make_ssd_inputs(1, l, 4, 3, 2, 5)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    dt = F.softplus(t["dt_raw"])
    args = (t["x"], dt, t["A"], t["B"], t["C"], 8)
    out, final, varlen = ops.mamba_chunk_scan_combined(
        *args, seq_idx=seq_idx, cu_seqlens=cu, return_final_states=True, return_varlen_states=True
    )
    out_only, varlen_only = ops.mamba_chunk_scan_combined(
        *args, seq_idx=seq_idx, cu_seqlens=cu, return_varlen_states=True
    )
    assert varlen.shape == (len(lengths), 4, 3, 5)
    assert torch.equal(varlen, varlen_only) and torch.equal(out, out_only)
    start = 0
    for i, m in enumerate(lengths):
        sl = slice(start, start + m)
        _, piece_final = naive_ssd(t["x"][:, sl], dt[:, sl], t["A"], t["B"][:, sl], t["C"][:, sl])
        assert (varlen[i] - piece_final[0]).abs().max().item() < TOL, i
        start += m
    assert (final[0] - varlen[-1]).abs().max().item() < TOL


def test_float32_and_bfloat16_inputs():
    t = make_ssd_inputs(2, 40, 4, 8, 2, 16)
    dt_ref = F.softplus(t["dt_raw"] + t["dt_bias"])
    ref, ref_final = naive_ssd(t["x"], dt_ref, t["A"], t["B"], t["C"], D=t["D"], z=t["z"])
    scale = ref.abs().max().item()
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x, dt, B, C, z = (t[k].to(dtype) for k in ("x", "dt_raw", "B", "C", "z"))
        out, final = ops.mamba_chunk_scan_combined(
            x,
            dt,
            t["A"].float(),
            B,
            C,
            16,
            D=t["D"].float(),
            z=z,
            dt_bias=t["dt_bias"].float(),
            dt_softplus=True,
            return_final_states=True,
        )
        assert out.dtype == dtype and final.dtype == torch.float32
        # compare with the float64 recurrence on the same (rounded) inputs
        r, r_final = naive_ssd(
            x.double(),
            F.softplus(dt.double() + t["dt_bias"].float().double()),
            t["A"],
            B.double(),
            C.double(),
            D=t["D"].float().double(),
            z=z.double(),
        )
        assert (out.double() - r).abs().max().item() < rtol * scale
        assert (final.double() - r_final).abs().max().item() < rtol * r_final.abs().max().item()


def test_autocast_does_not_lower_internal_precision():
    t = make_ssd_inputs(1, 40, 4, 8, 2, 16)
    args = [t[k].float() for k in ("x", "dt_raw", "A", "B", "C")]
    kw = dict(D=t["D"].float(), dt_bias=t["dt_bias"].float(), dt_softplus=True)
    plain = ops.mamba_chunk_scan_combined(*args, 16, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = ops.mamba_chunk_scan_combined(*args, 16, **kw)
    assert under_autocast.dtype == torch.float32
    assert (under_autocast - plain).abs().max().item() < 1e-5 * plain.abs().max().item()


def test_rejects_bad_shapes():
    t = make_ssd_inputs(1, 8, 4, 2, 2, 3)
    with pytest.raises(ValueError):
        ops.mamba_chunk_scan_combined(t["x"], t["dt_raw"][..., :3], t["A"], t["B"], t["C"], 4)
    with pytest.raises(ValueError):
        ops.mamba_chunk_scan_combined(t["x"], t["dt_raw"], t["A"], t["B"][:, :, :1], t["C"], 4)
    with pytest.raises(ValueError):
        ops.mamba_chunk_scan_combined(
            t["x"], t["dt_raw"], t["A"], t["B"], t["C"], 4, return_varlen_states=True
        )


# ----------------------------------------------------------------------------------------------
# mamba_chunk_scan_combined: backward
# ----------------------------------------------------------------------------------------------


def test_gradcheck_tiny():
    t = make_ssd_inputs(1, 7, 2, 2, 1, 2, seed=3)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1]], dtype=torch.int32)
    names = ["x", "dt_raw", "A", "B", "C", "D", "z", "dt_bias", "init"]
    inputs = [
        t[k][:1].clone().requires_grad_() if k == "init" else t[k].clone().requires_grad_() for k in names
    ]

    def fn(x, dt, A, B, C, D, z, dt_bias, init):
        return ops.mamba_chunk_scan_combined(
            x,
            dt,
            A,
            B,
            C,
            3,
            D=D,
            z=z,
            dt_bias=dt_bias,
            initial_states=init,
            dt_softplus=True,
            return_final_states=True,
        )

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)

    def fn_packed(x, dt, A, B, C, D, z, dt_bias, init):
        return ops.mamba_chunk_scan_combined(
            x,
            dt,
            A,
            B,
            C,
            2,
            D=D,
            z=z,
            dt_bias=dt_bias,
            initial_states=init,
            dt_softplus=True,
            seq_idx=seq_idx,
            return_final_states=True,
        )

    assert torch.autograd.gradcheck(fn_packed, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_match_recurrence(packed):
    b, l, h, p, g, n = 1, 29, 4, 3, 2, 4
    t = make_ssd_inputs(b, l, h, p, g, n, seed=7)
    seq_idx = torch.tensor([[0] * 9 + [1] * 12 + [2] * 8], dtype=torch.int32) if packed else None
    names = ["x", "dt_raw", "A", "B", "C", "D", "z", "dt_bias", "init"]
    gen = torch.Generator().manual_seed(11)
    g_out = torch.randn(b, l, h, p, generator=gen, dtype=F64)
    g_final = torch.randn(b, h, p, n, generator=gen, dtype=F64)

    def grads(use_chunked):
        leaves = {k: (t[k][:b] if k == "init" else t[k]).clone().requires_grad_() for k in names}
        if use_chunked:
            out, final = ops.mamba_chunk_scan_combined(
                leaves["x"],
                leaves["dt_raw"],
                leaves["A"],
                leaves["B"],
                leaves["C"],
                8,
                D=leaves["D"],
                z=leaves["z"],
                dt_bias=leaves["dt_bias"],
                dt_softplus=True,
                initial_states=leaves["init"],
                seq_idx=seq_idx,
                return_final_states=True,
            )
        else:
            dt = F.softplus(leaves["dt_raw"] + leaves["dt_bias"])
            out, final = naive_ssd(
                leaves["x"],
                dt,
                leaves["A"],
                leaves["B"],
                leaves["C"],
                D=leaves["D"],
                z=leaves["z"],
                initial_states=leaves["init"],
                seq_idx=seq_idx,
            )
        ((out * g_out).sum() + (final * g_final).sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    got, want = grads(True), grads(False)
    for k in names:
        assert got[k] is not None, k
        err = (got[k] - want[k]).abs().max().item()
        assert err < 1e-9 * max(1.0, want[k].abs().max().item()), (k, err)


# ----------------------------------------------------------------------------------------------
# mamba_chunk_scan_combined against the quadratic-form reference ssd_minimal
# ----------------------------------------------------------------------------------------------

SSD_INPUT_NAMES = ["x", "dt_raw", "A", "B", "C", "D", "z", "dt_bias", "init"]


def _chunked(v, chunk, seq_idx=None):
    return ops.mamba_chunk_scan_combined(
        v["x"],
        v["dt_raw"],
        v["A"],
        v["B"],
        v["C"],
        chunk,
        D=v["D"],
        z=v["z"],
        dt_bias=v["dt_bias"],
        dt_softplus=True,
        initial_states=v["init"],
        seq_idx=seq_idx,
        return_final_states=True,
    )


def _minimal(v, seq_idx=None):
    """mamba_chunk_scan_combined's contract around ssd_minimal: dt bias + softplus, skip, gate."""
    dt = F.softplus(v["dt_raw"] + v["dt_bias"])
    y, final = ops.ssd_minimal(v["x"], dt, v["A"], v["B"], v["C"], initial_states=v["init"], seq_idx=seq_idx)
    return (y + v["x"] * v["D"]) * F.silu(v["z"]), final


@pytest.mark.parametrize(
    "chunk,packed",
    [
        pytest.param(1, False, id="chunk1"),
        pytest.param(4, False, id="chunk4_L_not_multiple"),
        pytest.param(7, False, id="chunk7_L_multiple"),
        pytest.param(8, False, id="chunk8_L_not_multiple"),
        pytest.param(32, False, id="chunk_longer_than_L"),
        pytest.param(4, True, id="chunk4_packed"),
    ],
)
def test_chunked_ssd_matches_minimal_reference(chunk, packed):
    """Outputs, final states and the gradient of every input agree with ssd_minimal (float64)."""
    b, l, h, p, g, n = 2, 21, 4, 3, 2, 5
    t = make_ssd_inputs(b, l, h, p, g, n, seed=17)
    seq_idx = None
    if packed:  # boundaries inside a chunk (5) and on a chunk edge (16); id 1 spans 3 chunks
        seq_idx = torch.tensor([[0] * 5 + [1] * 11 + [2] * 5] * b, dtype=torch.int32)
    gen = torch.Generator().manual_seed(18)
    g_out = torch.randn(b, l, h, p, generator=gen, dtype=F64)
    g_final = torch.randn(b, h, p, n, generator=gen, dtype=F64)

    def run(fn):
        v = {k: t[k].clone().requires_grad_() for k in SSD_INPUT_NAMES}
        out, final = fn(v)
        ((out * g_out).sum() + (final * g_final).sum()).backward()
        return out.detach(), final.detach(), {k: v[k].grad for k in SSD_INPUT_NAMES}

    out, final, grads = run(lambda v: _chunked(v, chunk, seq_idx))
    ref, ref_final, ref_grads = run(lambda v: _minimal(v, seq_idx))
    assert out.shape == ref.shape and final.shape == ref_final.shape == (b, h, p, n)
    assert (out - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())
    assert (final - ref_final).abs().max().item() < TOL * max(1.0, ref_final.abs().max().item())
    for k in SSD_INPUT_NAMES:
        assert grads[k] is not None and grads[k].abs().max().item() > 0, k
        err = (grads[k] - ref_grads[k]).abs().max().item()
        assert err < TOL * max(1.0, ref_grads[k].abs().max().item()), (k, err)
