"""Tests of the pure-PyTorch Mamba2 kernels in hybrid_megatron.models.ssd.

Every reference here is written independently of the module under test: a token-by-token
float64 recurrence for the SSD, ``F.conv1d`` for the causal conv, explicit formulas for the
gated RMSNorm. Sizes are tiny so the whole file runs in seconds on two CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_megatron.models import ssd

F64 = torch.float64
TOL = 1e-9  # float64 paths; the brief's bound is 1e-6, real errors are ~1e-14


# ----------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------


def naive_ssd(x, dt, A, B, C, D=None, z=None, initial_states=None, seq_idx=None):
    """Sequential SSM recurrence, one token at a time (dt already processed).

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t + D x_t ; y *= silu(z).
    With seq_idx the state is zeroed wherever the id differs from the previous token's (the
    state before token 0 belongs to id 0). Returns (y, final_state).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Bh = B.repeat_interleave(h // g, dim=2)
    Ch = C.repeat_interleave(h // g, dim=2)
    state = initial_states if initial_states is not None else x.new_zeros(b, h, p, n)
    ys = []
    for t in range(l):
        if seq_idx is not None:
            prev = seq_idx[:, t - 1] if t > 0 else torch.zeros_like(seq_idx[:, 0])
            state = state * (seq_idx[:, t] == prev).to(x.dtype)[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        y = (state * Ch[:, t, :, None, :]).sum(-1)
        if D is not None:
            y = y + x[:, t] * (D[:, None] if D.dim() == 1 else D)
        ys.append(y)
    y = torch.stack(ys, dim=1)
    if z is not None:
        y = y * F.silu(z)
    return y, state


def ref_conv(x, weight, bias=None, activation=None):
    """Causal depthwise conv through F.conv1d: x (b, d, l), weight (d, w)."""
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=x.shape[1])
    out = out[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


def ref_gated_rmsnorm(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """RMSNorm over groups of channels with SiLU gate: the formula from mamba-ssm's docstring."""
    if z is not None and not norm_before_gate:
        x = x * F.silu(z)
    gs = x.shape[-1] if group_size is None else group_size
    xg = x.reshape(*x.shape[:-1], x.shape[-1] // gs, gs)
    out = (xg / torch.sqrt((xg**2).mean(-1, keepdim=True) + eps)).reshape(x.shape) * weight
    if z is not None and norm_before_gate:
        out = out * F.silu(z)
    return out


def make_ssd_inputs(b, l, h, p, g, n, dtype=F64, seed=0):
    """Random SSD inputs with a realistic dt range (softplus of shifted normals) and A < 0."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    return dict(
        x=rnd(b, l, h, p).to(dtype),
        dt_raw=(rnd(b, l, h) - 1.0).to(dtype),
        A=-(torch.rand(h, generator=gen, dtype=F64) + 0.3),
        B=rnd(b, l, g, n).to(dtype),
        C=rnd(b, l, g, n).to(dtype),
        D=rnd(h, p),
        D1=rnd(h),
        z=rnd(b, l, h, p).to(dtype),
        dt_bias=rnd(h) * 0.5,
        init=rnd(b, h, p, n),
    )


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
    out = ssd.mamba_chunk_scan_combined(t["x"], dt_in, t["A"], t["B"], t["C"], chunk, **kw)
    assert out.shape == (b, l, h, p) and out.dtype == F64
    assert (out - ref).abs().max().item() < TOL


def test_D_per_head_and_dt_limit_clamp():
    t = make_ssd_inputs(2, 30, 4, 3, 2, 4)
    limit = (0.2, 0.6)
    dt_ref = F.softplus(t["dt_raw"] + t["dt_bias"]).clamp(*limit)
    ref, _ = naive_ssd(t["x"], dt_ref, t["A"], t["B"], t["C"], D=t["D1"], z=t["z"])
    args = (t["x"], t["dt_raw"], t["A"], t["B"], t["C"], 8)
    kw = dict(D=t["D1"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
    out = ssd.mamba_chunk_scan_combined(*args, dt_limit=limit, **kw)
    assert (out - ref).abs().max().item() < TOL
    # the clamp is active on this data, so dropping it must change the result
    unclamped = ssd.mamba_chunk_scan_combined(*args, **kw)
    assert (unclamped - ref).abs().max().item() > 1e-3


def test_initial_and_final_states_and_split_prefill():
    b, l, h, p, g, n = 2, 45, 4, 4, 2, 6
    t = make_ssd_inputs(b, l, h, p, g, n)
    dt = F.softplus(t["dt_raw"])
    ref, ref_final = naive_ssd(
        t["x"], dt, t["A"], t["B"], t["C"], D=t["D"], initial_states=t["init"]
    )
    out, final = ssd.mamba_chunk_scan_combined(
        t["x"], dt, t["A"], t["B"], t["C"], 16, D=t["D"],
        initial_states=t["init"], return_final_states=True,
    )
    assert final.shape == (b, h, p, n)
    assert (out - ref).abs().max().item() < TOL
    assert (final - ref_final).abs().max().item() < TOL

    # chunked prefill: the final state of the first part seeds the second part
    k = 19
    out1, mid = ssd.mamba_chunk_scan_combined(
        t["x"][:, :k], dt[:, :k], t["A"], t["B"][:, :k], t["C"][:, :k], 16, D=t["D"],
        initial_states=t["init"], return_final_states=True,
    )
    out2, final2 = ssd.mamba_chunk_scan_combined(
        t["x"][:, k:], dt[:, k:], t["A"], t["B"][:, k:], t["C"][:, k:], 16, D=t["D"],
        initial_states=mid, return_final_states=True,
    )
    assert (torch.cat([out1, out2], dim=1) - ref).abs().max().item() < TOL
    assert (final2 - ref_final).abs().max().item() < TOL


def test_chunk_size_invariance():
    t = make_ssd_inputs(1, 70, 4, 4, 2, 8)
    outs, finals = [], []
    for chunk in (1, 3, 8, 16, 64, 128):
        out, final = ssd.mamba_chunk_scan_combined(
            t["x"], t["dt_raw"], t["A"], t["B"], t["C"], chunk, D=t["D"], z=t["z"],
            dt_bias=t["dt_bias"], dt_softplus=True, initial_states=t["init"],
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
    out, final = ssd.mamba_chunk_scan_combined(
        t["x"], dt, t["A"], t["B"], t["C"], 8, D=t["D"], z=t["z"], initial_states=init,
        seq_idx=seq_idx, return_final_states=True,
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
            t["x"][:, sl], dt[:, sl], t["A"], t["B"][:, sl], t["C"][:, sl], D=t["D"],
            z=t["z"][:, sl], initial_states=init if i == 0 else None,
        )
        pieces.append(piece)
        start += m
    assert (out - torch.cat(pieces, dim=1)).abs().max().item() < TOL
    assert (final - piece_final).abs().max().item() < TOL
    # without seq_idx the state leaks across boundaries: the test above can fail
    leaky = ssd.mamba_chunk_scan_combined(
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
    out, final, varlen = ssd.mamba_chunk_scan_combined(
        *args, seq_idx=seq_idx, cu_seqlens=cu, return_final_states=True, return_varlen_states=True
    )
    out_only, varlen_only = ssd.mamba_chunk_scan_combined(
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
        out, final = ssd.mamba_chunk_scan_combined(
            x, dt, t["A"].float(), B, C, 16, D=t["D"].float(), z=z, dt_bias=t["dt_bias"].float(),
            dt_softplus=True, return_final_states=True,
        )
        assert out.dtype == dtype and final.dtype == torch.float32
        # compare with the float64 recurrence on the same (rounded) inputs
        r, r_final = naive_ssd(
            x.double(), F.softplus(dt.double() + t["dt_bias"].float().double()), t["A"],
            B.double(), C.double(), D=t["D"].float().double(), z=z.double(),
        )
        assert (out.double() - r).abs().max().item() < rtol * scale
        assert (final.double() - r_final).abs().max().item() < rtol * r_final.abs().max().item()


def test_autocast_does_not_lower_internal_precision():
    t = make_ssd_inputs(1, 40, 4, 8, 2, 16)
    args = [t[k].float() for k in ("x", "dt_raw", "A", "B", "C")]
    kw = dict(D=t["D"].float(), dt_bias=t["dt_bias"].float(), dt_softplus=True)
    plain = ssd.mamba_chunk_scan_combined(*args, 16, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = ssd.mamba_chunk_scan_combined(*args, 16, **kw)
    assert under_autocast.dtype == torch.float32
    assert (under_autocast - plain).abs().max().item() < 1e-5 * plain.abs().max().item()


def test_rejects_bad_shapes():
    t = make_ssd_inputs(1, 8, 4, 2, 2, 3)
    with pytest.raises(ValueError):
        ssd.mamba_chunk_scan_combined(t["x"], t["dt_raw"][..., :3], t["A"], t["B"], t["C"], 4)
    with pytest.raises(ValueError):
        ssd.mamba_chunk_scan_combined(t["x"], t["dt_raw"], t["A"], t["B"][:, :, :1], t["C"], 4)
    with pytest.raises(ValueError):
        ssd.mamba_chunk_scan_combined(
            t["x"], t["dt_raw"], t["A"], t["B"], t["C"], 4, return_varlen_states=True
        )


# ----------------------------------------------------------------------------------------------
# mamba_chunk_scan_combined: backward
# ----------------------------------------------------------------------------------------------


def test_gradcheck_tiny():
    t = make_ssd_inputs(1, 7, 2, 2, 1, 2, seed=3)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1]], dtype=torch.int32)
    names = ["x", "dt_raw", "A", "B", "C", "D", "z", "dt_bias", "init"]
    inputs = [t[k][:1].clone().requires_grad_() if k == "init" else t[k].clone().requires_grad_()
              for k in names]

    def fn(x, dt, A, B, C, D, z, dt_bias, init):
        return ssd.mamba_chunk_scan_combined(
            x, dt, A, B, C, 3, D=D, z=z, dt_bias=dt_bias, initial_states=init,
            dt_softplus=True, return_final_states=True,
        )

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)

    def fn_packed(x, dt, A, B, C, D, z, dt_bias, init):
        return ssd.mamba_chunk_scan_combined(
            x, dt, A, B, C, 2, D=D, z=z, dt_bias=dt_bias, initial_states=init,
            dt_softplus=True, seq_idx=seq_idx, return_final_states=True,
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
            out, final = ssd.mamba_chunk_scan_combined(
                leaves["x"], leaves["dt_raw"], leaves["A"], leaves["B"], leaves["C"], 8,
                D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=True,
                initial_states=leaves["init"], seq_idx=seq_idx, return_final_states=True,
            )
        else:
            dt = F.softplus(leaves["dt_raw"] + leaves["dt_bias"])
            out, final = naive_ssd(
                leaves["x"], dt, leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                z=leaves["z"], initial_states=leaves["init"], seq_idx=seq_idx,
            )
        ((out * g_out).sum() + (final * g_final).sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    got, want = grads(True), grads(False)
    for k in names:
        assert got[k] is not None, k
        err = (got[k] - want[k]).abs().max().item()
        assert err < 1e-9 * max(1.0, want[k].abs().max().item()), (k, err)


# ----------------------------------------------------------------------------------------------
# mamba_split_conv1d_scan_combined
# ----------------------------------------------------------------------------------------------


def split_reference(zxbcdt, conv_w, conv_b, dt_bias, A, D, headdim, ngroups, *, seq_lengths=None,
                    initial_states=None, rmsnorm_weight=None, eps=1e-6, norm_before_gate=True,
                    outproj_weight=None, outproj_bias=None, d_nonssm=0):
    """conv -> split -> SSD recurrence -> gate / gated norm -> projection, spelled out."""
    b, l, _ = zxbcdt.shape
    nheads = D.shape[0]
    dim = nheads * headdim
    dstate = (conv_w.shape[0] - dim) // ngroups // 2
    zx0 = zxbcdt[..., : 2 * d_nonssm]
    z = zxbcdt[..., 2 * d_nonssm : 2 * d_nonssm + dim]
    xBC = zxbcdt[..., 2 * d_nonssm + dim : 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate]
    dt = zxbcdt[..., -nheads:]
    xBC_t = xBC.transpose(1, 2)
    if seq_lengths is None:
        conv = ref_conv(xBC_t, conv_w, conv_b, "silu")
    else:  # packed: every sequence is convolved on its own
        conv = torch.cat(
            [ref_conv(part, conv_w, conv_b, "silu") for part in xBC_t.split(seq_lengths, dim=-1)],
            dim=-1,
        )
    conv = conv.transpose(1, 2)
    x = conv[..., :dim].reshape(b, l, nheads, headdim)
    B = conv[..., dim : dim + ngroups * dstate].reshape(b, l, ngroups, dstate)
    C = conv[..., dim + ngroups * dstate :].reshape(b, l, ngroups, dstate)
    seq_idx = None
    if seq_lengths is not None:
        seq_idx = torch.cat([torch.full((m,), i) for i, m in enumerate(seq_lengths)])[None]
    y, final = naive_ssd(
        x, F.softplus(dt + dt_bias), A, B, C, D=D,
        z=z.reshape(b, l, nheads, headdim) if rmsnorm_weight is None else None,
        initial_states=initial_states, seq_idx=seq_idx,
    )
    y = y.reshape(b, l, dim)
    if rmsnorm_weight is not None:
        y = ref_gated_rmsnorm(y, rmsnorm_weight, z, eps, dim // ngroups, norm_before_gate)
    if d_nonssm:
        y = torch.cat([F.silu(zx0[..., :d_nonssm]) * zx0[..., d_nonssm:], y], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return y, final


SPLIT_CASES = [
    pytest.param(dict(), id="D_per_head_gate_in_ssd"),
    pytest.param(dict(D_2d=True, ngroups=2, init=True), id="D_2d_ngroups2_init_final"),
    pytest.param(dict(ngroups=2, rmsnorm=True, norm_before_gate=True), id="rmsnorm_before_gate"),
    pytest.param(dict(ngroups=2, rmsnorm=True, norm_before_gate=False, outproj=True),
                 id="rmsnorm_after_gate_outproj"),
    pytest.param(dict(outproj=True), id="outproj_no_norm"),
    pytest.param(dict(d_nonssm=3, rmsnorm=True), id="nonssm_swiglu_prefix"),
    pytest.param(dict(packed=True, ngroups=2), id="seq_idx_packed"),
]


def _split_inputs(case, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = 1 if case.get("packed") else 2
    l, nheads, headdim, dstate, width = 27, 4, 3, 5, 4
    ngroups = case.get("ngroups", 1)
    d_nonssm = case.get("d_nonssm", 0)
    dim = nheads * headdim
    conv_dim = dim + 2 * ngroups * dstate

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64) * s

    inp = dict(
        zxbcdt=rnd(b, l, 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads),
        conv_w=rnd(conv_dim, width, s=0.5),
        conv_b=rnd(conv_dim, s=0.1),
        dt_bias=rnd(nheads, s=0.5) - 1.0,
        A=-(torch.rand(nheads, generator=gen, dtype=F64) + 0.3),
        D=rnd(nheads, headdim) if case.get("D_2d") else rnd(nheads),
        init=rnd(b, nheads, headdim, dstate) if case.get("init") else None,
        norm_w=rnd(dim, s=0.3) + 1.0 if case.get("rmsnorm") else None,
        out_w=rnd(7, d_nonssm + dim, s=0.3) if case.get("outproj") else None,
        out_b=rnd(7, s=0.1) if case.get("outproj") else None,
    )
    meta = dict(headdim=headdim, ngroups=ngroups, d_nonssm=d_nonssm,
                seq_lengths=[6, 10, 11] if case.get("packed") else None)
    return inp, meta


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_conv1d_scan_matches_composition(case):
    inp, meta = _split_inputs(case)
    seq_idx = None
    if meta["seq_lengths"]:
        seq_idx = torch.cat(
            [torch.full((m,), i, dtype=torch.int32) for i, m in enumerate(meta["seq_lengths"])]
        )[None]
    out, final = ssd.mamba_split_conv1d_scan_combined(
        inp["zxbcdt"], inp["conv_w"], inp["conv_b"], inp["dt_bias"], inp["A"], inp["D"], 8,
        initial_states=inp["init"], seq_idx=seq_idx, return_final_states=True,
        activation="silu", rmsnorm_weight=inp["norm_w"], rmsnorm_eps=1e-6,
        outproj_weight=inp["out_w"], outproj_bias=inp["out_b"],
        headdim=None if case.get("D_2d") else meta["headdim"], ngroups=meta["ngroups"],
        norm_before_gate=case.get("norm_before_gate", True),
    )
    ref, ref_final = split_reference(
        inp["zxbcdt"], inp["conv_w"], inp["conv_b"], inp["dt_bias"], inp["A"], inp["D"],
        meta["headdim"], meta["ngroups"], seq_lengths=meta["seq_lengths"],
        initial_states=inp["init"], rmsnorm_weight=inp["norm_w"],
        norm_before_gate=case.get("norm_before_gate", True), outproj_weight=inp["out_w"],
        outproj_bias=inp["out_b"], d_nonssm=meta["d_nonssm"],
    )
    assert out.shape == ref.shape and out.dtype == F64
    assert (out - ref).abs().max().item() < TOL
    assert (final - ref_final).abs().max().item() < TOL


def test_split_conv1d_scan_gradients_match_composition():
    case = dict(ngroups=2, rmsnorm=True, norm_before_gate=False, outproj=True)
    inp, meta = _split_inputs(case, seed=5)
    names = ["zxbcdt", "conv_w", "conv_b", "dt_bias", "A", "D", "norm_w", "out_w", "out_b"]

    def grads(use_impl):
        v = {k: inp[k].clone().requires_grad_() for k in names}
        common = (v["zxbcdt"], v["conv_w"], v["conv_b"], v["dt_bias"], v["A"], v["D"])
        if use_impl:
            out = ssd.mamba_split_conv1d_scan_combined(
                *common, 8, rmsnorm_weight=v["norm_w"], outproj_weight=v["out_w"],
                outproj_bias=v["out_b"], headdim=meta["headdim"], ngroups=meta["ngroups"],
                norm_before_gate=False,
            )
        else:
            out, _ = split_reference(
                *common, meta["headdim"], meta["ngroups"], rmsnorm_weight=v["norm_w"],
                norm_before_gate=False, outproj_weight=v["out_w"], outproj_bias=v["out_b"],
            )
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).reshape(out.shape)).sum().backward()
        return {k: t.grad for k, t in v.items()}

    got, want = grads(True), grads(False)
    for k in names:
        err = (got[k] - want[k]).abs().max().item()
        assert err < 1e-9 * max(1.0, want[k].abs().max().item()), (k, err)


def test_split_conv1d_scan_zxbcdt_layout():
    """dt is the LAST nheads channels and z the FIRST dim ones: perturbing each moves the output."""
    inp, meta = _split_inputs(dict())
    base = ssd.mamba_split_conv1d_scan_combined(
        inp["zxbcdt"], inp["conv_w"], inp["conv_b"], inp["dt_bias"], inp["A"], inp["D"], 8,
        headdim=meta["headdim"],
    )
    dim = inp["D"].shape[0] * meta["headdim"]
    for lo, hi in ((0, dim), (inp["zxbcdt"].shape[-1] - 4, inp["zxbcdt"].shape[-1])):
        bumped = inp["zxbcdt"].clone()
        bumped[..., lo:hi] += 0.5
        moved = ssd.mamba_split_conv1d_scan_combined(
            bumped, inp["conv_w"], inp["conv_b"], inp["dt_bias"], inp["A"], inp["D"], 8,
            headdim=meta["headdim"],
        )
        assert (moved - base).abs().max().item() > 1e-3
    with pytest.raises(ValueError):
        ssd.mamba_split_conv1d_scan_combined(
            inp["zxbcdt"][..., 1:], inp["conv_w"], inp["conv_b"], inp["dt_bias"], inp["A"],
            inp["D"], 8, headdim=meta["headdim"],
        )


# ----------------------------------------------------------------------------------------------
# causal conv1d
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_causal_conv1d_fn_matches_conv1d(activation, with_bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 13, generator=gen, dtype=F64)
    w = torch.randn(6, 4, generator=gen, dtype=F64)
    bias = torch.randn(6, generator=gen, dtype=F64) if with_bias else None
    out = ssd.causal_conv1d_fn(x, w, bias, activation=activation)
    assert (out - ref_conv(x, w, bias, activation)).abs().max().item() < TOL

    # initial_states are the inputs preceding x; final states are the last width-1 inputs
    init = torch.randn(2, 6, 3, generator=gen, dtype=F64)
    out_i, fin = ssd.causal_conv1d_fn(
        x, w, bias, initial_states=init, return_final_states=True, activation=activation
    )
    ref_i = ref_conv(torch.cat([init, x], -1), w, bias, activation)[..., 3:]
    assert (out_i - ref_i).abs().max().item() < TOL
    assert torch.equal(fin, x[..., -3:])
    buf = torch.zeros(2, 6, 3, dtype=F64)
    _, fin_buf = ssd.causal_conv1d_fn(
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
    out = ssd.causal_conv1d_fn(x, w, bias, seq_idx=seq, activation="silu")
    ref = torch.cat([ref_conv(p, w, bias, "silu") for p in x.split(lengths, -1)], -1)
    assert (out - ref).abs().max().item() < TOL
    seq_pad = seq.clone()
    seq_pad[0, -2:] = -1  # padding tokens produce zeros
    out_pad = ssd.causal_conv1d_fn(x, w, bias, seq_idx=seq_pad, activation="silu")
    assert torch.all(out_pad[..., -2:] == 0)
    assert (out_pad[..., :-2] - ref[..., :-2]).abs().max().item() < TOL
    with pytest.raises(ValueError):
        ssd.causal_conv1d_fn(x, w, bias, seq_idx=seq, return_final_states=True)

    xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
    outb = ssd.causal_conv1d_fn(xb, wb, None, activation="silu")
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
        a = ssd.causal_conv1d_update(x[:, :, t], shift_state, wt, None, "silu")
        c = ssd.causal_conv1d_update(
            x[:, :, t], ring, wt, None, "silu",
            cache_seqlens=torch.full((b,), t, dtype=torch.int32),
        )
        assert (a - c).abs().max().item() < TOL
    ref = ref_conv(x, wt, None, "silu")[..., -1]
    assert (a - ref).abs().max().item() < TOL
    # several tokens at once give the same as token by token
    state2 = torch.zeros(b, d, w - 1, dtype=F64)
    multi = ssd.causal_conv1d_update(x, state2, wt, None, "silu")
    assert (multi - ref_conv(x, wt, None, "silu")).abs().max().item() < TOL
    assert torch.equal(state2, shift_state)


def test_causal_conv1d_varlen_states():
    gen = torch.Generator().manual_seed(6)
    lengths = [5, 2, 9]
    x = torch.randn(sum(lengths), 4, generator=gen, dtype=F64)
    cu = torch.tensor([0, 5, 7, 16], dtype=torch.int32)
    states = ssd.causal_conv1d_varlen_states(x, cu, state_len=4)
    assert states.shape == (3, 4, 4)
    for i in range(3):
        seq = x[cu[i] : cu[i + 1]].T
        want = F.pad(seq, (4 - seq.shape[-1], 0))[..., -4:]
        assert torch.equal(states[i], want)


# ----------------------------------------------------------------------------------------------
# decode (token-by-token) vs full sequence, as megatron-core's MambaMixer uses them
# ----------------------------------------------------------------------------------------------


def _decode_setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, l, nheads, headdim, ngroups, dstate, width = 2, 21, 4, 3, 2, 5, 4
    dim = nheads * headdim
    conv_dim = dim + 2 * ngroups * dstate

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64) * s

    return dict(
        b=b, l=l, h=nheads, p=headdim, g=ngroups, n=dstate, w=width, dim=dim,
        xBC=rnd(b, l, conv_dim), z=rnd(b, l, dim), dt=rnd(b, l, nheads),
        conv_w=rnd(conv_dim, width, s=0.5), conv_b=rnd(conv_dim, s=0.1),
        dt_bias=rnd(nheads, s=0.5) - 1.0, A=-(torch.rand(nheads, generator=gen, dtype=F64) + 0.3),
        D=rnd(nheads),
    )


def _full_forward(s, xBC, z, dt, conv_init=None, ssm_init=None):
    """Prefill path: causal_conv1d_fn + mamba_chunk_scan_combined (megatron's _ssm_prefill)."""
    b, l = xBC.shape[:2]
    conv, conv_final = ssd.causal_conv1d_fn(
        xBC.transpose(1, 2), s["conv_w"], s["conv_b"], initial_states=conv_init,
        return_final_states=True, activation="silu",
    )
    conv = conv.transpose(1, 2)
    dim, gn = s["dim"], s["g"] * s["n"]
    y, final = ssd.mamba_chunk_scan_combined(
        conv[..., :dim].reshape(b, l, s["h"], s["p"]), dt, s["A"],
        conv[..., dim : dim + gn].reshape(b, l, s["g"], s["n"]),
        conv[..., dim + gn :].reshape(b, l, s["g"], s["n"]), 8, D=s["D"],
        z=z.reshape(b, l, s["h"], s["p"]), dt_bias=s["dt_bias"], dt_softplus=True,
        initial_states=ssm_init, return_final_states=True,
    )
    return y.reshape(b, l, dim), conv_final, final


def _decode_step(s, xBC_t, z_t, dt_t, conv_state, ssm_state, batch_indices=None):
    """One token the way MambaMixer._ssm_decode calls the kernels (broadcast/tied shapes)."""
    h, p, n, g, dim = s["h"], s["p"], s["n"], s["g"], s["dim"]
    xBC_t = ssd.causal_conv1d_update(
        xBC_t, conv_state, s["conv_w"], s["conv_b"], "silu", conv_state_indices=batch_indices
    )
    bsz = xBC_t.shape[0]
    x_t = xBC_t[:, :dim].reshape(bsz, h, p)
    B_t = xBC_t[:, dim : dim + g * n].reshape(bsz, g, n)
    C_t = xBC_t[:, dim + g * n :].reshape(bsz, g, n)
    y = ssd.selective_state_update(
        ssm_state, x_t,
        dt_t[:, :, None].expand(bsz, h, p),  # repeat(dt, "b h -> b h p"): stride-0 view
        s["A"][:, None, None].expand(h, p, n),
        B_t, C_t,
        s["D"][:, None].expand(h, p),
        z=z_t.reshape(bsz, h, p),
        dt_bias=s["dt_bias"][:, None].expand(h, p),
        dt_softplus=True,
        state_batch_indices=batch_indices,
    )
    return y.reshape(bsz, dim)


def test_decode_reproduces_full_sequence():
    s = _decode_setup()
    b, l, w = s["b"], s["l"], s["w"]
    y_full, conv_final, ssm_final = _full_forward(s, s["xBC"], s["z"], s["dt"])

    conv_state = torch.zeros(b, s["xBC"].shape[-1], w, dtype=F64)  # megatron keeps width d_conv
    ssm_state = torch.zeros(b, s["h"], s["p"], s["n"], dtype=F64)
    ys = [
        _decode_step(s, s["xBC"][:, t], s["z"][:, t], s["dt"][:, t], conv_state, ssm_state)
        for t in range(l)
    ]
    assert (torch.stack(ys, 1) - y_full).abs().max().item() < TOL
    assert (ssm_state - ssm_final).abs().max().item() < TOL
    assert torch.equal(conv_state[..., 1:], conv_final)
    assert torch.equal(conv_state, s["xBC"][:, -w:].transpose(1, 2))


def test_prefill_then_decode():
    s = _decode_setup(seed=1)
    k = 13
    y_full, _, _ = _full_forward(s, s["xBC"], s["z"], s["dt"])
    y_pre, conv_final, ssm_final = _full_forward(s, s["xBC"][:, :k], s["z"][:, :k], s["dt"][:, :k])
    # what MambaMixer._ssm_prefill stores: the last d_conv conv inputs and the final SSM state
    conv_state = F.pad(s["xBC"][:, :k].transpose(1, 2), (s["w"] - k, 0)).contiguous()
    assert torch.equal(conv_state[..., 1:], conv_final)
    ssm_state = ssm_final.clone()
    ys = [
        _decode_step(s, s["xBC"][:, t], s["z"][:, t], s["dt"][:, t], conv_state, ssm_state)
        for t in range(k, s["l"])
    ]
    assert (torch.cat([y_pre, torch.stack(ys, 1)], 1) - y_full).abs().max().item() < TOL
    # chunked prefill continuing from the stored states gives the same tail
    y_tail, _, _ = _full_forward(
        s, s["xBC"][:, k:], s["z"][:, k:], s["dt"][:, k:],
        conv_init=conv_final, ssm_init=ssm_final,
    )
    assert (y_tail - y_full[:, k:]).abs().max().item() < TOL


def test_decode_with_state_indices_and_padding_slot():
    s = _decode_setup(seed=2)
    b, w = s["b"], s["w"]
    conv_dim = s["xBC"].shape[-1]
    gen = torch.Generator().manual_seed(9)
    conv_cache = torch.randn(5, conv_dim, w, generator=gen, dtype=F64)
    ssm_cache = torch.randn(5, s["h"], s["p"], s["n"], generator=gen, dtype=F64)
    idx = torch.tensor([3, 0, -1], dtype=torch.int32)  # third request is padding
    xBC_t = torch.cat([s["xBC"][:, 0], s["xBC"][:1, 1]])
    z_t = torch.cat([s["z"][:, 0], s["z"][:1, 1]])
    dt_t = torch.cat([s["dt"][:, 0], s["dt"][:1, 1]])

    # the same two requests decoded directly on their own state rows
    conv_direct = conv_cache[[3, 0]].clone()
    ssm_direct = ssm_cache[[3, 0]].clone()
    y_direct = _decode_step(s, xBC_t[:b], z_t[:b], dt_t[:b], conv_direct, ssm_direct)

    conv_before, ssm_before = conv_cache.clone(), ssm_cache.clone()
    y = _decode_step(s, xBC_t, z_t, dt_t, conv_cache, ssm_cache, batch_indices=idx)
    assert (y[:b] - y_direct).abs().max().item() < TOL
    assert torch.all(y[b] == 0)
    assert torch.equal(conv_cache[[3, 0]], conv_direct)
    assert (ssm_cache[[3, 0]] - ssm_direct).abs().max().item() < TOL
    untouched = [1, 2, 4]
    assert torch.equal(conv_cache[untouched], conv_before[untouched])
    assert torch.equal(ssm_cache[untouched], ssm_before[untouched])


def test_selective_state_update_without_heads_and_low_precision_state():
    gen = torch.Generator().manual_seed(8)
    b, d, n = 3, 6, 4
    state = torch.randn(b, d, n, generator=gen, dtype=F64)
    x, dt, z = (torch.randn(b, d, generator=gen, dtype=F64) for _ in range(3))
    A = -torch.rand(d, n, generator=gen, dtype=F64)
    B, C = (torch.randn(b, n, generator=gen, dtype=F64) for _ in range(2))
    D = torch.randn(d, generator=gen, dtype=F64)
    dt_sp = F.softplus(dt)
    want_state = state * torch.exp(dt_sp[..., None] * A) + (dt_sp * x)[..., None] * B[:, None]
    want = ((want_state * C[:, None]).sum(-1) + D * x) * F.silu(z)
    s = state.clone()
    out = ssd.selective_state_update(s, x, dt, A, B, C, D=D, z=z, dt_softplus=True)
    assert out.shape == (b, d)
    assert (out - want).abs().max().item() < TOL and (s - want_state).abs().max().item() < TOL

    s16 = state.to(torch.bfloat16)
    out16 = ssd.selective_state_update(
        s16, x.bfloat16(), dt.bfloat16(), A.float(), B.bfloat16(), C.bfloat16(), D=D.float(),
        z=z.bfloat16(), dt_softplus=True,
    )
    assert out16.dtype == torch.bfloat16 and s16.dtype == torch.bfloat16
    assert (s16.double() - want_state).abs().max().item() < 5e-2 * want_state.abs().max().item()
    assert (out16.double() - want).abs().max().item() < 5e-2 * want.abs().max().item()


# ----------------------------------------------------------------------------------------------
# RMSNormGated
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_rmsnorm_gated_formula(group_size, norm_before_gate, gated):
    gen = torch.Generator().manual_seed(12)
    hidden = 12
    x = torch.randn(3, 5, hidden, generator=gen, dtype=F64) * 3
    z = torch.randn(3, 5, hidden, generator=gen, dtype=F64) if gated else None
    norm = ssd.RMSNormGated(hidden, eps=1e-5, group_size=group_size,
                            norm_before_gate=norm_before_gate, dtype=F64)
    assert norm.bias is None and torch.equal(norm.weight, torch.ones(hidden, dtype=F64))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=gen, dtype=F64))
    out = norm(x, z)

    gs = hidden if group_size is None else group_size
    gate = F.silu(z) if gated else torch.ones_like(x)
    pre = x * gate if not norm_before_gate else x
    groups = pre.reshape(3, 5, hidden // gs, gs)
    rms = torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)
    want = (groups / rms).reshape(3, 5, hidden) * norm.weight.detach()
    if norm_before_gate:
        want = want * gate
    assert (out - want).abs().max().item() < TOL
    out.sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_rmsnorm_gated_groups_differ_and_dtype():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4, 8, generator=gen)
    x[:, 4:] *= 10  # groups with different scales: grouped and global norms must disagree
    global_norm = ssd.RMSNormGated(8, group_size=None)(x)
    grouped = ssd.RMSNormGated(8, group_size=4)(x)
    assert (global_norm - grouped).abs().max().item() > 0.1
    xb = x.bfloat16()
    outb = ssd.RMSNormGated(8, group_size=4, dtype=torch.bfloat16)(xb, xb)
    assert outb.dtype == torch.bfloat16
    want = ref_gated_rmsnorm(xb.double(), torch.ones(8, dtype=F64), xb.double(), 1e-5, 4, True)
    assert (outb.double() - want).abs().max().item() < 2e-2 * want.abs().max().item()
