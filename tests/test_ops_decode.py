"""Tests of the decode ops (``causal_conv1d_update``, ``selective_state_update``): token by token
they reproduce the full-sequence ops, as megatron-core's MambaMixer uses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid_megatron import ops
from tests.ops_helpers import F64, TOL


def _decode_setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, l, nheads, headdim, ngroups, dstate, width = 2, 21, 4, 3, 2, 5, 4
    dim = nheads * headdim
    conv_dim = dim + 2 * ngroups * dstate

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64) * s

    return dict(
        b=b,
        l=l,
        h=nheads,
        p=headdim,
        g=ngroups,
        n=dstate,
        w=width,
        dim=dim,
        xBC=rnd(b, l, conv_dim),
        z=rnd(b, l, dim),
        dt=rnd(b, l, nheads),
        conv_w=rnd(conv_dim, width, s=0.5),
        conv_b=rnd(conv_dim, s=0.1),
        dt_bias=rnd(nheads, s=0.5) - 1.0,
        A=-(torch.rand(nheads, generator=gen, dtype=F64) + 0.3),
        D=rnd(nheads),
    )


def _full_forward(s, xBC, z, dt, conv_init=None, ssm_init=None):
    """Prefill path: causal_conv1d_fn + mamba_chunk_scan_combined (megatron's _ssm_prefill)."""
    b, l = xBC.shape[:2]
    conv, conv_final = ops.causal_conv1d_fn(
        xBC.transpose(1, 2),
        s["conv_w"],
        s["conv_b"],
        initial_states=conv_init,
        return_final_states=True,
        activation="silu",
    )
    conv = conv.transpose(1, 2)
    dim, gn = s["dim"], s["g"] * s["n"]
    y, final = ops.mamba_chunk_scan_combined(
        conv[..., :dim].reshape(b, l, s["h"], s["p"]),
        dt,
        s["A"],
        conv[..., dim : dim + gn].reshape(b, l, s["g"], s["n"]),
        conv[..., dim + gn :].reshape(b, l, s["g"], s["n"]),
        8,
        D=s["D"],
        z=z.reshape(b, l, s["h"], s["p"]),
        dt_bias=s["dt_bias"],
        dt_softplus=True,
        initial_states=ssm_init,
        return_final_states=True,
    )
    return y.reshape(b, l, dim), conv_final, final


def _decode_step(s, xBC_t, z_t, dt_t, conv_state, ssm_state, batch_indices=None):
    """One token the way MambaMixer._ssm_decode calls the kernels (broadcast/tied shapes)."""
    h, p, n, g, dim = s["h"], s["p"], s["n"], s["g"], s["dim"]
    xBC_t = ops.causal_conv1d_update(
        xBC_t, conv_state, s["conv_w"], s["conv_b"], "silu", conv_state_indices=batch_indices
    )
    bsz = xBC_t.shape[0]
    x_t = xBC_t[:, :dim].reshape(bsz, h, p)
    B_t = xBC_t[:, dim : dim + g * n].reshape(bsz, g, n)
    C_t = xBC_t[:, dim + g * n :].reshape(bsz, g, n)
    y = ops.selective_state_update(
        ssm_state,
        x_t,
        dt_t[:, :, None].expand(bsz, h, p),  # repeat(dt, "b h -> b h p"): stride-0 view
        s["A"][:, None, None].expand(h, p, n),
        B_t,
        C_t,
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
        _decode_step(s, s["xBC"][:, t], s["z"][:, t], s["dt"][:, t], conv_state, ssm_state) for t in range(l)
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
        s,
        s["xBC"][:, k:],
        s["z"][:, k:],
        s["dt"][:, k:],
        conv_init=conv_final,
        ssm_init=ssm_final,
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
    out = ops.selective_state_update(s, x, dt, A, B, C, D=D, z=z, dt_softplus=True)
    assert out.shape == (b, d)
    assert (out - want).abs().max().item() < TOL and (s - want_state).abs().max().item() < TOL

    s16 = state.to(torch.bfloat16)
    out16 = ops.selective_state_update(
        s16,
        x.bfloat16(),
        dt.bfloat16(),
        A.float(),
        B.bfloat16(),
        C.bfloat16(),
        D=D.float(),
        z=z.bfloat16(),
        dt_softplus=True,
    )
    assert out16.dtype == torch.bfloat16 and s16.dtype == torch.bfloat16
    assert (s16.double() - want_state).abs().max().item() < 5e-2 * want_state.abs().max().item()
    assert (out16.double() - want).abs().max().item() < 5e-2 * want.abs().max().item()
