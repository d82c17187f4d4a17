"""Independent references for the ops tests: a token-by-token float64 recurrence for the SSD,
``F.conv1d`` for the causal conv, the explicit formula for the gated RMSNorm, and random inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

F64 = torch.float64
TOL = 1e-9  # float64 paths; real errors are ~1e-14


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
