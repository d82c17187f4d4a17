"""Tests of the fused mixer core ``mamba_split_conv1d_scan_combined`` against the composition
conv -> split -> recurrence -> gate / gated norm -> projection, spelled out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_megatron import ops
from tests.ops_helpers import F64, TOL, naive_ssd, ref_conv, ref_gated_rmsnorm


def split_reference(
    zxbcdt,
    conv_w,
    conv_b,
    dt_bias,
    A,
    D,
    headdim,
    ngroups,
    *,
    seq_lengths=None,
    initial_states=None,
    rmsnorm_weight=None,
    eps=1e-6,
    norm_before_gate=True,
    outproj_weight=None,
    outproj_bias=None,
    d_nonssm=0,
):
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
        x,
        F.softplus(dt + dt_bias),
        A,
        B,
        C,
        D=D,
        z=z.reshape(b, l, nheads, headdim) if rmsnorm_weight is None else None,
        initial_states=initial_states,
        seq_idx=seq_idx,
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
    pytest.param(
        dict(ngroups=2, rmsnorm=True, norm_before_gate=False, outproj=True), id="rmsnorm_after_gate_outproj"
    ),
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
    meta = dict(
        headdim=headdim,
        ngroups=ngroups,
        d_nonssm=d_nonssm,
        seq_lengths=[6, 10, 11] if case.get("packed") else None,
    )
    return inp, meta


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_conv1d_scan_matches_composition(case):
    inp, meta = _split_inputs(case)
    seq_idx = None
    if meta["seq_lengths"]:
        seq_idx = torch.cat(
            [torch.full((m,), i, dtype=torch.int32) for i, m in enumerate(meta["seq_lengths"])]
        )[None]
    out, final = ops.mamba_split_conv1d_scan_combined(
        inp["zxbcdt"],
        inp["conv_w"],
        inp["conv_b"],
        inp["dt_bias"],
        inp["A"],
        inp["D"],
        8,
        initial_states=inp["init"],
        seq_idx=seq_idx,
        return_final_states=True,
        activation="silu",
        rmsnorm_weight=inp["norm_w"],
        rmsnorm_eps=1e-6,
        outproj_weight=inp["out_w"],
        outproj_bias=inp["out_b"],
        headdim=None if case.get("D_2d") else meta["headdim"],
        ngroups=meta["ngroups"],
        norm_before_gate=case.get("norm_before_gate", True),
    )
    ref, ref_final = split_reference(
        inp["zxbcdt"],
        inp["conv_w"],
        inp["conv_b"],
        inp["dt_bias"],
        inp["A"],
        inp["D"],
        meta["headdim"],
        meta["ngroups"],
        seq_lengths=meta["seq_lengths"],
        initial_states=inp["init"],
        rmsnorm_weight=inp["norm_w"],
        norm_before_gate=case.get("norm_before_gate", True),
        outproj_weight=inp["out_w"],
        outproj_bias=inp["out_b"],
        d_nonssm=meta["d_nonssm"],
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
            out = ops.mamba_split_conv1d_scan_combined(
                *common,
                8,
                rmsnorm_weight=v["norm_w"],
                outproj_weight=v["out_w"],
                outproj_bias=v["out_b"],
                headdim=meta["headdim"],
                ngroups=meta["ngroups"],
                norm_before_gate=False,
            )
        else:
            out, _ = split_reference(
                *common,
                meta["headdim"],
                meta["ngroups"],
                rmsnorm_weight=v["norm_w"],
                norm_before_gate=False,
                outproj_weight=v["out_w"],
                outproj_bias=v["out_b"],
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
    base = ops.mamba_split_conv1d_scan_combined(
        inp["zxbcdt"],
        inp["conv_w"],
        inp["conv_b"],
        inp["dt_bias"],
        inp["A"],
        inp["D"],
        8,
        headdim=meta["headdim"],
    )
    dim = inp["D"].shape[0] * meta["headdim"]
    for lo, hi in ((0, dim), (inp["zxbcdt"].shape[-1] - 4, inp["zxbcdt"].shape[-1])):
        bumped = inp["zxbcdt"].clone()
        bumped[..., lo:hi] += 0.5
        moved = ops.mamba_split_conv1d_scan_combined(
            bumped,
            inp["conv_w"],
            inp["conv_b"],
            inp["dt_bias"],
            inp["A"],
            inp["D"],
            8,
            headdim=meta["headdim"],
        )
        assert (moved - base).abs().max().item() > 1e-3
    with pytest.raises(ValueError):
        ops.mamba_split_conv1d_scan_combined(
            inp["zxbcdt"][..., 1:],
            inp["conv_w"],
            inp["conv_b"],
            inp["dt_bias"],
            inp["A"],
            inp["D"],
            8,
            headdim=meta["headdim"],
        )
