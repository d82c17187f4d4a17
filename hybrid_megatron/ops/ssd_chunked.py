"""Chunked SSD scan, mamba-ssm's ``mamba_chunk_scan_combined`` in differentiable torch ops.

The CPU path of the Mamba2 mixer: autograd supplies the backward pass and the code runs on any
device. It is the chunked algorithm of the Mamba2 paper (state space duality), not a token-by-token
scan:

1. within each chunk of ``chunk_size`` tokens the output is a masked, decay-weighted
   attention-like product ``(C B^T * L) x`` with ``L`` built from segment sums of ``dt * A``;
2. each chunk's contribution to the state at its last token is a low-rank sum over its tokens;
3. a recurrence over chunks (written as a lower-triangular decay matrix over chunk boundaries)
   passes states from chunk to chunk;
4. the state entering each chunk is read out through ``C`` with the in-chunk decay.

:mod:`hybrid_megatron.ops.ssd_minimal` is the same computation in its shortest readable form; the
tests hold this one to it.

Precision: like the kernels, all arithmetic happens in float32 for 16/32-bit inputs and results
come back in the input dtype; intermediates are not rounded to bf16/fp16 in between, so
half-precision results differ from the kernels by rounding only. Float64 inputs are computed in
float64, which is what makes ``gradcheck`` usable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid_megatron.ops._common import compute_dtype, softplus

__all__ = ["mamba_chunk_scan_combined"]

NO_DT_LIMIT = (0.0, float("inf"))


def _segsum(a: Tensor) -> Tensor:
    """Segment sums ``S[..., i, j] = a[..., j+1] + ... + a[..., i]`` for ``i >= j``, else -inf.

    Takes ``a`` of shape (..., T), returns (..., T, T). Summing the masked, repeated values with
    one cumsum instead of subtracting two prefix sums avoids the cancellation error that
    ``cumsum[i] - cumsum[j]`` suffers once the prefix sums are large.
    """
    T = a.shape[-1]
    rep = a.unsqueeze(-1).expand(*a.shape, T)  # rep[..., i, j] = a[..., i]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    seg = rep.masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return seg.masked_fill(~lower, float("-inf"))


def process_dt(
    dt: Tensor,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype,
) -> Tensor:
    """dt (..., h) -> clamp(softplus(dt + dt_bias)) in ``dtype``, exactly as the cumsum kernel.

    The kernel clamps to ``dt_limit`` unconditionally, so with the default (0, inf) a negative
    dt (possible only without softplus) becomes 0; that is kept on purpose.
    """
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = softplus(dt)
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    z: Tensor | None,
    initial_states: Tensor | None,
    seq_idx: Tensor | None,
    cu_seqlens: Tensor | None,
    cdt: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Core SSD on already-processed ``dt`` (float, (b, l, h)); everything returned in ``cdt``.

    Returns (y (b, l, h, p), final_states (b, h, p, n), varlen_states (nseq, h, p, n) or None).
    """
    # Under autocast the matmuls below would silently drop to bf16/fp16; the Triton kernels
    # accumulate in fp32 whatever autocast says, so it is switched off for the SSD core.
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _ssd_chunked_impl(x, dt, A, B, C, chunk_size, D, z, initial_states, seq_idx, cu_seqlens, cdt)


def _ssd_chunked_impl(x, dt, A, B, C, chunk_size, D, z, initial_states, seq_idx, cu_seqlens, cdt):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    Q = int(chunk_size)
    nc = max(1, math.ceil(l / Q))
    pad = nc * Q - l

    xf = x.to(cdt)
    Bf = B.to(cdt)
    Cf = C.to(cdt)
    # Padded tokens get dt = 0: no decay, no input, so they change neither outputs nor states
    # (the kernels zero dt beyond seqlen after the clamp for the same reason).
    if pad:
        xf_p = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dt_p = F.pad(dt, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    else:
        xf_p, dt_p = xf, dt

    # Heads are grouped as h = g * r (head i reads group i // r), so B/C stay per group and
    # broadcast over the r heads of each group instead of being materialised per head.
    x_c = xf_p.reshape(b, nc, Q, g, r, p).permute(0, 3, 4, 1, 2, 5)  # (b, g, r, c, Q, p)
    dt_c = dt_p.reshape(b, nc, Q, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, Q)
    B_c = Bf.reshape(b, nc, Q, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)  # (b, g, 1, c, Q, n)
    C_c = Cf.reshape(b, nc, Q, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)  # (b, g, 1, c, Q, n)

    a = dt_c * A.to(cdt).reshape(g, r, 1, 1)  # log-decay per token
    a_cs = a.cumsum(dim=-1)  # log-decay from chunk start through token t (inclusive)
    seg = _segsum(a)  # (b, g, r, c, Q, Q)
    seg_pos = seg

    if seq_idx is not None:
        seq = seq_idx.to(torch.long)
        if pad:
            # Repeating the last id keeps "the chunk's last token" in the last real sequence.
            seq = torch.cat([seq, seq[:, -1:].expand(b, pad)], dim=1)
        seq_c = seq.reshape(b, nc, Q)
        same_seq = seq_c.unsqueeze(-1) == seq_c.unsqueeze(-2)  # (b, c, Q, Q)
        seg = seg.masked_fill(~same_seq[:, None, None], float("-inf"))
        last = seq_c[:, :, -1]
        # The state before the first token belongs to sequence 0, as in the kernels.
        prev_last = torch.cat([torch.zeros_like(last[:, :1]), last[:, :-1]], dim=1)  # (b, c)

    decay = seg.exp()  # (b, g, r, c, Q, Q): exp(a[s+1] + ... + a[t]) for s <= t

    # 1. intra-chunk (diagonal blocks): y[t] = sum_{s<=t} (C_t . B_s) decay[t, s] dt_s x_s
    CB = C_c @ B_c.transpose(-1, -2)  # (b, g, 1, c, Q, Q)
    y = (CB * decay * dt_c.unsqueeze(-2)) @ x_c  # (b, g, r, c, Q, p)

    # 2. each chunk's own contribution to the state at its last token; row Q-1 of the decay
    #    matrix is exactly exp(sum of a after s), already masked to the last token's sequence.
    w_end = decay[..., -1, :] * dt_c  # (b, g, r, c, Q)
    chunk_states = (x_c * w_end.unsqueeze(-1)).transpose(-1, -2) @ B_c  # (b, g, r, c, p, n)

    # 3. inter-chunk recurrence S_c = exp(A_c) S_{c-1} + chunk_states_c, solved for all chunks at
    #    once: P[z] = sum_{c <= z} exp(total decay of chunks c..z-1) S[c], with S[0] the initial
    #    state. P[z] is the state entering chunk z; P[nc] is the final state.
    if initial_states is not None:
        init = initial_states.to(cdt).reshape(b, g, r, 1, p, n)
    else:
        init = chunk_states.new_zeros(b, g, r, 1, p, n)
    S = torch.cat([init, chunk_states], dim=3)  # (b, g, r, c+1, p, n)
    chunk_decay = _segsum(F.pad(a_cs[..., -1], (1, 0)))  # (b, g, r, c+1, c+1)
    if seq_idx is not None:
        # A chunk whose last token starts a new sequence drops the incoming state (the kernels
        # zero the passing scale there). Transitions from boundary c to z survive only if no
        # chunk in c..z-1 did that.
        breaks = (last != prev_last).to(torch.long)
        n_breaks = F.pad(breaks.cumsum(dim=1), (1, 0))  # (b, c+1)
        keep = n_breaks.unsqueeze(-1) == n_breaks.unsqueeze(-2)
        chunk_decay = chunk_decay.masked_fill(~keep[:, None, None], float("-inf"))
    P = chunk_decay.exp() @ S.flatten(-2)  # (b, g, r, c+1, p*n)
    P = P.unflatten(-1, (p, n))
    prev_states = P[:, :, :, :nc]  # (b, g, r, c, p, n)
    final_states = P[:, :, :, nc].reshape(b, h, p, n)

    # 4. state -> output: y[t] += C_t . (exp(a_cs[t]) P[chunk])
    y_off = (C_c @ prev_states.transpose(-1, -2)) * a_cs.exp().unsqueeze(-1)
    if seq_idx is not None:
        carries = (seq_c == prev_last.unsqueeze(-1)).to(cdt)  # token continues the previous seq
        y_off = y_off * carries[:, None, None, :, :, None]
    y = y + y_off

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, nc * Q, h, p)[:, :l]

    if D is not None:
        Df = D.to(cdt)
        y = y + xf * (Df.unsqueeze(-1) if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(cdt))

    varlen_states = None
    if cu_seqlens is not None:
        varlen_states = _varlen_states(cu_seqlens, seg_pos, a_cs, dt_c, x_c, B_c, prev_states, Q, h, p, n)
    return y, final_states, varlen_states


def _varlen_states(cu_seqlens, seg_pos, a_cs, dt_c, x_c, B_c, prev_states, Q, h, p, n):
    """State after the last token of each packed sequence (batch 1), like ``chunk_state_varlen``.

    For a sequence ending at token e in chunk c: the state entering chunk c (only if the sequence
    started before chunk c) decayed to e, plus the in-chunk tokens of that sequence up to e.
    Sequence membership comes from ``cu_seqlens`` alone, as in the kernel.
    """
    cu = cu_seqlens.to(device=x_c.device, dtype=torch.long)
    starts, ends = cu[:-1], cu[1:] - 1
    ci = torch.div(ends, Q, rounding_mode="floor")
    e_loc = ends - ci * Q
    s_loc = (starts - ci * Q).clamp(min=0)
    k = torch.arange(Q, device=x_c.device)
    in_seq = (k.unsqueeze(0) >= s_loc.unsqueeze(1)).to(x_c.dtype)  # (nseq, Q)

    rows = seg_pos[0][:, :, ci, e_loc].exp()  # (g, r, nseq, Q); -inf past e_loc -> 0
    w = rows * dt_c[0][:, :, ci] * in_seq
    states = (x_c[0][:, :, ci] * w.unsqueeze(-1)).transpose(-1, -2) @ B_c[0][:, :, ci]
    carry_in = (starts < ci * Q).to(x_c.dtype)
    carry = prev_states[0][:, :, ci] * (a_cs[0][:, :, ci, e_loc].exp() * carry_in)[..., None, None]
    states = states + carry  # (g, r, nseq, p, n)
    return states.permute(2, 0, 1, 3, 4).reshape(-1, h, p, n)


def mamba_chunk_scan_combined(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    return_final_states: bool = False,
    return_varlen_states: bool = False,
):
    """Mamba2 selective state space (SSD) over a whole sequence, chunked; mamba-ssm's signature.

    Recurrence per head (state ``H`` of shape (headdim, dstate))::

        dt_t = clamp(softplus?(dt_t + dt_bias), *dt_limit)
        H_t  = exp(dt_t * A) H_{t-1} + dt_t x_t B_t^T        (H_{-1} = initial_states or 0)
        y_t  = H_t C_t + D x_t;   y_t *= silu(z_t) if z is given

    Args:
        x: (batch, seqlen, nheads, headdim).
        dt: (batch, seqlen, nheads), raw time steps.
        A: (nheads,), usually negative (``-exp(A_log)``).
        B, C: (batch, seqlen, ngroups, dstate); head i uses group ``i // (nheads // ngroups)``.
        chunk_size: tokens per chunk; any positive int (seqlen is padded internally).
        D: (nheads,) or (nheads, headdim) skip connection, or None.
        z: (batch, seqlen, nheads, headdim) gate, or None.
        dt_bias: (nheads,) added to dt before softplus, or None.
        initial_states: (batch, nheads, headdim, dstate), or None for zeros.
        seq_idx: (batch, seqlen) int ids of packed sequences; the state is reset wherever the id
            changes (the state before token 0 counts as sequence 0, so initial_states only
            reach tokens with id 0). Ids must be non-decreasing along the sequence.
        cu_seqlens: (num_sequences + 1,) cumulative lengths; used only with
            ``return_varlen_states`` (then batch must be 1, and seq_idx should be given too).
        dt_softplus: apply softplus to ``dt + dt_bias``.
        dt_limit: (min, max) clamp of the processed dt.
        return_final_states: also return the state after the last token.
        return_varlen_states: also return the state after the last token of each sequence.

    Returns:
        out (batch, seqlen, nheads, headdim) in x's dtype; with ``return_final_states`` the tuple
        (out, final_states) with final_states (batch, nheads, headdim, dstate) in float32 (float64
        for float64 inputs); with ``return_varlen_states`` additionally varlen_states
        (num_sequences, nheads, headdim, dstate) in C's dtype, as the last tuple element:
        (out, varlen_states) or (out, final_states, varlen_states).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if B.dim() != 4:
        raise ValueError(f"B must be (batch, seqlen, ngroups, dstate), got {tuple(B.shape)}")
    ngroups, dstate = B.shape[2], B.shape[3]
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be divisible by ngroups ({ngroups})")
    if tuple(B.shape) != (batch, seqlen, ngroups, dstate) or tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"B {tuple(B.shape)} and C {tuple(C.shape)} must be (b, l, g, n)")
    if tuple(dt.shape) != (batch, seqlen, nheads):
        raise ValueError(f"dt must be {(batch, seqlen, nheads)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (nheads,):
        raise ValueError(f"A must be ({nheads},), got {tuple(A.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if D is not None and tuple(D.shape) not in ((nheads, headdim), (nheads,)):
        raise ValueError(f"D must be ({nheads},) or ({nheads}, {headdim}), got {tuple(D.shape)}")
    if dt_bias is not None and tuple(dt_bias.shape) != (nheads,):
        raise ValueError(f"dt_bias must be ({nheads},), got {tuple(dt_bias.shape)}")
    if seq_idx is not None and tuple(seq_idx.shape) != (batch, seqlen):
        raise ValueError(f"seq_idx must be {(batch, seqlen)}, got {tuple(seq_idx.shape)}")
    if initial_states is not None and tuple(initial_states.shape) != (
        batch,
        nheads,
        headdim,
        dstate,
    ):
        raise ValueError(
            f"initial_states must be {(batch, nheads, headdim, dstate)}, got {tuple(initial_states.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if return_varlen_states:
        if cu_seqlens is None:
            raise ValueError("cu_seqlens must be provided if return_varlen_states is True")
        if batch != 1:
            raise ValueError("return_varlen_states needs batch == 1 (packed sequences)")
    else:
        cu_seqlens = None  # the kernels ignore it unless varlen states are asked for

    cdt = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)
    dt_proc = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    y, final_states, varlen_states = ssd_chunked(
        x, dt_proc, A, B, C, chunk_size, D, z, initial_states, seq_idx, cu_seqlens, cdt
    )
    out = y.to(x.dtype)
    if not return_varlen_states:
        return (out, final_states) if return_final_states else out
    varlen_states = varlen_states.to(C.dtype)
    if return_final_states:
        return out, final_states, varlen_states
    return out, varlen_states
