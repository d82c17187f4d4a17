"""Pure-PyTorch Mamba2 kernels: chunked SSD, causal depthwise conv, decode steps, gated RMSNorm.

These are drop-in replacements for the functions megatron-core 0.16.1's ``MambaMixer`` imports
from mamba-ssm 2.2.6 (``mamba_chunk_scan_combined``, ``mamba_split_conv1d_scan_combined``,
``selective_state_update``, ``layernorm_gated.RMSNorm``) and causal-conv1d 1.7
(``causal_conv1d_fn``, ``causal_conv1d_update``, ``causal_conv1d_varlen_states``). Signatures and
semantics follow those libraries; ``hybrid_megatron.compat.mamba_kernels`` binds them into
``megatron.core.ssm.mamba_mixer`` when the Triton/CUDA kernels are missing.

Everything here is built from differentiable torch ops, so autograd supplies the backward pass
and the code runs on any device (CPU included). The SSD is the real chunked algorithm of the
Mamba2 paper (state space duality), not a token-by-token scan:

1. within each chunk of ``chunk_size`` tokens the output is a masked, decay-weighted
   attention-like product ``(C B^T * L) x`` with ``L`` built from segment sums of ``dt * A``;
2. each chunk's contribution to the state at its last token is a low-rank sum over its tokens;
3. a recurrence over chunks (written as a lower-triangular decay matrix over chunk boundaries)
   passes states from chunk to chunk;
4. the state entering each chunk is read out through ``C`` with the in-chunk decay.

Precision: like the kernels, all arithmetic happens in float32 for 16/32-bit inputs and results
come back in the input dtype. Unlike the kernels, intermediates (chunk states, the SSD output
before the gated norm, conv outputs feeding the SSD inside ``mamba_split_conv1d_scan_combined``)
are not rounded to bf16/fp16 in between, so half-precision results differ from the kernels by
rounding only. Float64 inputs are computed in float64, which is what makes ``gradcheck`` usable.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "mamba_chunk_scan_combined",
    "mamba_split_conv1d_scan_combined",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "causal_conv1d_varlen_states",
    "selective_state_update",
    "rmsnorm_fn",
    "RMSNormGated",
]

_NO_DT_LIMIT = (0.0, float("inf"))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any floating input is float64, else float32 (the kernels' accumulation type)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _softplus(x: Tensor) -> Tensor:
    # The kernels use log(1 + exp(x)) for x <= 20 and the identity above; F.softplus's default
    # threshold of 20 is the same switch, so forward and gradient agree with them.
    return F.softplus(x, beta=1.0, threshold=20.0)


def _activate(x: Tensor, activation: Optional[str]) -> Tensor:
    if activation in ("silu", "swish"):
        return F.silu(x)
    return x


def _check_activation(activation: Optional[str]) -> None:
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")


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


def _process_dt(
    dt: Tensor,
    dt_bias: Optional[Tensor],
    dt_softplus: bool,
    dt_limit: Tuple[float, float],
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
        dt = _softplus(dt)
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


# --------------------------------------------------------------------------------------------
# chunked SSD
# --------------------------------------------------------------------------------------------


def _ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Optional[Tensor],
    z: Optional[Tensor],
    initial_states: Optional[Tensor],
    seq_idx: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    cdt: torch.dtype,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Core SSD on already-processed ``dt`` (float, (b, l, h)); everything returned in ``cdt``.

    Returns (y (b, l, h, p), final_states (b, h, p, n), varlen_states (nseq, h, p, n) or None).
    """
    # Under autocast the matmuls below would silently drop to bf16/fp16; the Triton kernels
    # accumulate in fp32 whatever autocast says, so it is switched off for the SSD core.
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _ssd_chunked_impl(
            x, dt, A, B, C, chunk_size, D, z, initial_states, seq_idx, cu_seqlens, cdt
        )


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
        varlen_states = _varlen_states(
            cu_seqlens, seg_pos, a_cs, dt_c, x_c, B_c, prev_states, Q, h, p, n
        )
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
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = _NO_DT_LIMIT,
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
            f"initial_states must be {(batch, nheads, headdim, dstate)}, "
            f"got {tuple(initial_states.shape)}"
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

    cdt = _compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)
    dt_proc = _process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    y, final_states, varlen_states = _ssd_chunked(
        x, dt_proc, A, B, C, chunk_size, D, z, initial_states, seq_idx, cu_seqlens, cdt
    )
    out = y.to(x.dtype)
    if not return_varlen_states:
        return (out, final_states) if return_final_states else out
    varlen_states = varlen_states.to(C.dtype)
    if return_final_states:
        return out, final_states, varlen_states
    return out, varlen_states


# --------------------------------------------------------------------------------------------
# causal depthwise conv1d (causal-conv1d)
# --------------------------------------------------------------------------------------------


def _depthwise_causal_taps(
    window: Tensor, weight: Tensor, bias: Optional[Tensor], out_len: int
) -> Tensor:
    """out[..., t] = bias + sum_k weight[:, k] * window[..., t + k]; w - 1 extra inputs on the left.

    window (b, d, out_len + w - 1), weight (d, w) -> (b, d, out_len). A loop over the (small)
    kernel width keeps this one code path for every caller and device.
    """
    width = weight.shape[1]
    out = window[..., 0:out_len] * weight[:, 0:1]
    for k in range(1, width):
        out = out + window[..., k : k + out_len] * weight[:, k : k + 1]
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    return out


def causal_conv1d_fn(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    return_final_states: bool = False,
    final_states_out: Optional[Tensor] = None,
    activation: Optional[str] = None,
):
    """Causal depthwise 1-D convolution with optional SiLU, as ``causal_conv1d.causal_conv1d_fn``.

    ``out[:, c, t] = act(bias[c] + sum_k weight[c, k] * x[:, c, t - (w - 1) + k])`` with zeros (or
    ``initial_states``) left of t = 0. Positional order is causal-conv1d's own; callers in
    megatron-core and mamba-ssm pass everything but x/weight/bias by keyword.

    Args:
        x: (batch, dim, seqlen), any memory layout.
        weight: (dim, width).
        bias: (dim,) or None.
        seq_idx: (batch, seqlen) int ids of packed sequences; a tap only reads inputs with the
            same id as the output token, and tokens with a negative id (padding) output 0.
            Cannot be combined with initial_states or return_final_states (as in causal-conv1d).
        initial_states: (batch, dim, width - 1), the inputs that precede x[..., 0], or None.
        return_final_states: also return the last width - 1 inputs (the next call's
            initial_states; zero-padded on the left when the history is shorter).
        final_states_out: (batch, dim, width - 1) tensor to write the final states into.
        activation: None, "silu" or "swish".

    Returns:
        out (batch, dim, seqlen) in x's dtype, or (out, final_states) with final_states
        (batch, dim, width - 1) in x's dtype (``final_states_out`` itself when given).
    """
    _check_activation(activation)
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, dim, seqlen), got {tuple(x.shape)}")
    batch, dim, seqlen = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight must be ({dim}, width), got {tuple(weight.shape)}")
    width = weight.shape[1]
    if seq_idx is not None:
        if initial_states is not None:
            raise ValueError("initial_states must be None if seq_idx is not None")
        if return_final_states:
            raise ValueError("If seq_idx is not None, we don't return final_states_out")
    if initial_states is not None and tuple(initial_states.shape) != (batch, dim, width - 1):
        raise ValueError(
            f"initial_states must be {(batch, dim, width - 1)}, got {tuple(initial_states.shape)}"
        )

    cdt = _compute_dtype(x, weight, bias, initial_states)
    xf = x.to(cdt)
    if initial_states is not None:
        history = initial_states.to(cdt)
    else:
        history = xf.new_zeros(batch, dim, width - 1)
    window = torch.cat([history, xf], dim=-1)  # (b, d, w - 1 + l)
    w = weight.to(cdt)
    bf = bias.to(cdt) if bias is not None else None

    if seq_idx is None:
        out = _depthwise_causal_taps(window, w, bf, seqlen)
    else:
        seq = seq_idx.to(torch.long)
        # Positions left of the sequence start carry id -1, so they never match a real token.
        seq_window = torch.cat([seq.new_full((batch, width - 1), -1), seq], dim=1)
        out = window.new_zeros(batch, dim, seqlen)
        for k in range(width):
            same = (seq_window[:, k : k + seqlen] == seq).to(cdt).unsqueeze(1)
            out = out + window[..., k : k + seqlen] * w[:, k : k + 1] * same
        if bf is not None:
            out = out + bf.unsqueeze(-1)
    out = _activate(out, activation)
    if seq_idx is not None:
        out = out.masked_fill((seq_idx < 0).unsqueeze(1), 0.0)
    out = out.to(x.dtype)

    if not return_final_states:
        return out
    final_states = window[..., window.shape[-1] - (width - 1) :].to(x.dtype)
    if final_states_out is not None:
        with torch.no_grad():
            final_states_out.copy_(final_states)
        return out, final_states_out
    return out, final_states


def _read_cache_rows(
    cache: Tensor, indices: Optional[Tensor], batch: int, names: tuple[str, str]
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The decode-cache rows of a batch, as mamba-ssm's update kernels address them.

    Takes the cache (rows first), the optional per-sample row ``indices`` (a negative index marks
    a padded sample, which reads row 0 and is masked later), the batch size and the names of the
    cache and indices arguments, for errors. Returns (rows, long indices or None, valid mask or None).
    """
    if indices is None:
        if cache.shape[0] != batch:
            raise ValueError(f"{names[0]} batch must equal x's batch without {names[1]}")
        return cache, None, None
    idx = indices.to(device=cache.device, dtype=torch.long)
    valid = idx >= 0
    return cache[idx.clamp(min=0)], idx, valid


def _write_cache_rows(
    cache: Tensor, new_rows: Tensor, idx: Optional[Tensor], valid: Optional[Tensor]
) -> None:
    """Stores ``new_rows`` into ``cache`` in place at the rows ``_read_cache_rows`` read; padded
    samples leave the cache untouched. Returns nothing."""
    # Cached states are inference buffers: never let them join an autograd graph.
    with torch.no_grad():
        new_rows = new_rows.detach()
        if valid is None:
            cache.copy_(new_rows)
        else:
            cache[idx[valid]] = new_rows[valid]


def _zero_padded_rows(out: Tensor, valid: Optional[Tensor]) -> Tensor:
    """``out`` (batch first) with padded samples' rows zeroed, as the kernels leave them."""
    if valid is None:
        return out
    return out * valid.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    cache_seqlens: Optional[Tensor] = None,
    conv_state_indices: Optional[Tensor] = None,
) -> Tensor:
    """Decode step(s) of the causal conv, updating ``conv_state`` in place (causal-conv1d's API).

    Args:
        x: (batch, dim) for one token or (batch, dim, seqlen) for a few.
        conv_state: (state_batch, dim, state_len) with state_len >= width - 1, holding the most
            recent inputs, oldest first. Updated in place: shifted left by seqlen with x appended
            (or, with ``cache_seqlens``, used as a circular buffer).
        weight: (dim, width).
        bias: (dim,) or None.
        activation: None, "silu" or "swish".
        cache_seqlens: (batch,) int; if given, conv_state is a circular buffer and x is written
            at positions ``cache_seqlens % state_len`` onward.
        conv_state_indices: (batch,) int; row of conv_state used by each batch entry (continuous
            batching). A negative index marks a padding entry: its output is 0 and no state row
            is touched.

    Returns:
        out with x's shape and dtype.
    """
    _check_activation(activation)
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    if state_len < width - 1:
        raise ValueError(f"conv_state length {state_len} must be >= width - 1 = {width - 1}")
    if conv_state.shape[1] != dim or tuple(weight.shape) != (dim, width):
        raise ValueError("conv_state / weight do not match x's dim")

    state, idx, valid = _read_cache_rows(
        conv_state, conv_state_indices, batch, ("conv_state", "conv_state_indices")
    )

    cdt = _compute_dtype(x, weight, bias, conv_state)
    if cache_seqlens is None:
        history = state[..., state_len - (width - 1) :]
        new_state = torch.cat([state, x.to(state.dtype)], dim=-1)[..., -state_len:]
    else:
        pos = cache_seqlens.to(device=x.device, dtype=torch.long).unsqueeze(1)
        read_idx = torch.remainder(pos + torch.arange(-(width - 1), 0, device=x.device), state_len)
        history = state.gather(2, read_idx.unsqueeze(1).expand(-1, dim, -1))
        write_idx = torch.remainder(pos + torch.arange(seqlen, device=x.device), state_len)
        new_state = state.scatter(2, write_idx.unsqueeze(1).expand(-1, dim, -1), x.to(state.dtype))
    window = torch.cat([history.to(cdt), x.to(cdt)], dim=-1)
    out = _depthwise_causal_taps(
        window, weight.to(cdt), bias.to(cdt) if bias is not None else None, seqlen
    )
    out = _activate(out, activation)

    _write_cache_rows(conv_state, new_state, idx, valid)
    out = _zero_padded_rows(out, valid).to(x.dtype)
    return out.squeeze(-1) if squeeze else out


def causal_conv1d_varlen_states(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """Conv states at the end of each packed sequence (causal_conv1d.causal_conv1d_varlen).

    Args:
        x: (total_tokens, dim), the conv inputs of all sequences back to back.
        cu_seqlens: (num_sequences + 1,), sorted cumulative lengths starting at 0.
        state_len: number of trailing inputs to keep per sequence.

    Returns:
        (num_sequences, dim, state_len) in x's dtype: the last ``state_len`` inputs of each
        sequence, oldest first; slots before the sequence's first token are 0.
    """
    total, dim = x.shape
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    starts, ends = cu[:-1], cu[1:]
    offs = torch.arange(-state_len, 0, device=x.device)
    pos = ends.unsqueeze(1) + offs  # (nseq, state_len)
    inside = pos >= starts.unsqueeze(1)
    gathered = x[pos.clamp(min=0, max=max(total - 1, 0))]  # (nseq, state_len, dim)
    gathered = gathered * inside.unsqueeze(-1).to(x.dtype)
    return gathered.transpose(1, 2)


# --------------------------------------------------------------------------------------------
# single-token SSM decode (selective_state_update)
# --------------------------------------------------------------------------------------------


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[Tensor] = None,
) -> Tensor:
    """One recurrent SSM step, updating ``state`` in place (mamba-ssm's selective_state_update).

    ``dt' = softplus?(dt + dt_bias)``; ``state = exp(dt' A) * state + dt' B x``;
    ``out = state C + D x``, times ``silu(z)`` if z is given. Broadcast views are accepted
    anywhere (megatron passes A, dt, dt_bias and D expanded over headdim/dstate with stride 0,
    which the kernel treats as "tied"; the arithmetic is the same).

    Args:
        state: (state_batch, dim, dstate) or (state_batch, nheads, dim, dstate).
        x: (batch, dim) or (batch, nheads, dim); dim is headdim when heads are present.
        dt: like x.
        A: (dim, dstate) or (nheads, dim, dstate).
        B, C: (batch, dstate) or (batch, ngroups, dstate).
        D: (dim,) or (nheads, dim), or None.
        z: like x, or None.
        dt_bias: (dim,) or (nheads, dim), or None.
        dt_softplus: apply softplus to dt + dt_bias (no dt_limit clamp here, as in mamba-ssm).
        state_batch_indices: (batch,) int rows of ``state`` to use; a negative index marks a
            padding entry whose output is 0 and whose state is left alone (as newer mamba-ssm).

    Returns:
        out with x's shape and dtype.
    """
    has_heads = state.dim() > 3
    if state.dim() == 3:
        state_v = state.unsqueeze(1)
    else:
        state_v = state
    x4 = x.unsqueeze(1) if x.dim() == 2 else x
    dt4 = dt.unsqueeze(1) if dt.dim() == 2 else dt
    A4 = A.unsqueeze(0) if A.dim() == 2 else A
    B4 = B.unsqueeze(1) if B.dim() == 2 else B
    C4 = C.unsqueeze(1) if C.dim() == 2 else C
    D4 = D.unsqueeze(0) if D is not None and D.dim() == 1 else D
    z4 = z.unsqueeze(1) if z is not None and z.dim() == 2 else z
    bias4 = dt_bias.unsqueeze(0) if dt_bias is not None and dt_bias.dim() == 1 else dt_bias

    _, nheads, dim, dstate = state_v.shape
    batch = x4.shape[0]
    ngroups = B4.shape[1]
    if tuple(x4.shape) != (batch, nheads, dim) or dt4.shape != x4.shape:
        raise ValueError(f"x/dt must be {(batch, nheads, dim)}, got {tuple(x4.shape)}")
    if tuple(A4.shape) != (nheads, dim, dstate):
        raise ValueError(f"A must be {(nheads, dim, dstate)}, got {tuple(A4.shape)}")
    if nheads % ngroups != 0:
        raise ValueError("nheads must be divisible by ngroups")
    if tuple(B4.shape) != (batch, ngroups, dstate) or C4.shape != B4.shape:
        raise ValueError(f"B/C must be {(batch, ngroups, dstate)}")
    if D4 is not None and tuple(D4.shape) != (nheads, dim):
        raise ValueError(f"D must be {(nheads, dim)}, got {tuple(D4.shape)}")
    if z4 is not None and z4.shape != x4.shape:
        raise ValueError("z must have x's shape")
    if bias4 is not None and tuple(bias4.shape) != (nheads, dim):
        raise ValueError(f"dt_bias must be {(nheads, dim)}, got {tuple(bias4.shape)}")

    cur, idx, valid = _read_cache_rows(
        state_v, state_batch_indices, batch, ("state", "state_batch_indices")
    )

    cdt = _compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    dtv = dt4.to(cdt)
    if bias4 is not None:
        dtv = dtv + bias4.to(cdt)
    if dt_softplus:
        dtv = _softplus(dtv)
    rep = nheads // ngroups
    Bh = B4.to(cdt).repeat_interleave(rep, dim=1)  # (batch, nheads, dstate)
    Ch = C4.to(cdt).repeat_interleave(rep, dim=1)
    xf = x4.to(cdt)
    decay = torch.exp(dtv.unsqueeze(-1) * A4.to(cdt))  # (batch, nheads, dim, dstate)
    new = cur.to(cdt) * decay + (dtv * xf).unsqueeze(-1) * Bh.unsqueeze(2)
    # The kernel reads the output from the updated fp32 state before storing it in state.dtype.
    out = (new * Ch.unsqueeze(2)).sum(dim=-1)
    if D4 is not None:
        out = out + xf * D4.to(cdt)
    if z4 is not None:
        out = out * F.silu(z4.to(cdt))

    _write_cache_rows(state_v, new.to(state.dtype), idx, valid)
    out = _zero_padded_rows(out, valid).to(x.dtype)
    return out if has_heads else out.squeeze(1)


# --------------------------------------------------------------------------------------------
# gated RMSNorm (mamba_ssm.ops.triton.layernorm_gated)
# --------------------------------------------------------------------------------------------


def rmsnorm_fn(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    eps: float = 1e-6,
    group_size: Optional[int] = None,
    norm_before_gate: bool = True,
) -> Tensor:
    """Grouped RMSNorm with an optional SiLU gate, as mamba-ssm's ``layernorm_gated.rmsnorm_fn``.

    With ``norm_before_gate``: ``rmsnorm(x) * w (+ b) * silu(z)``; otherwise
    ``rmsnorm(x * silu(z)) * w (+ b)``. The RMS is taken over consecutive groups of
    ``group_size`` channels (None means one group of all channels).

    Args:
        x: (..., hidden).
        weight: (hidden,); bias: (hidden,) or None.
        z: like x, or None (then no gate).
        eps: added to the mean square.
        group_size: channels per normalisation group; must divide hidden.
        norm_before_gate: where the gate goes, see above.

    Returns:
        Tensor with x's shape and dtype (computed in float32, or float64 for float64 x).
    """
    hidden = x.shape[-1]
    gs = hidden if group_size is None else int(group_size)
    if hidden % gs != 0:
        raise ValueError(f"group_size {gs} must divide the hidden size {hidden}")
    if z is not None and z.shape != x.shape:
        raise ValueError("z must have x's shape")
    cdt = _compute_dtype(x, weight, bias, z)
    xf = x.to(cdt)
    gate = F.silu(z.to(cdt)) if z is not None else None
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    xg = xf.unflatten(-1, (hidden // gs, gs))
    rstd = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    out = (xg * rstd).flatten(-2) * weight.to(cdt)
    if bias is not None:
        out = out + bias.to(cdt)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)


class RMSNormGated(torch.nn.Module):
    """Gated, grouped RMSNorm module; same constructor, parameters and forward as mamba-ssm's
    ``mamba_ssm.ops.triton.layernorm_gated.RMSNorm`` (megatron imports it as ``RMSNormGated``).

    Parameters: ``weight`` (hidden_size,) initialised to ones; ``bias`` is registered as None.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: Optional[int] = None,
        norm_before_gate: bool = True,
        device=None,
        dtype=None,
    ):
        """hidden_size: channels; eps: added to the mean square; group_size: channels per group
        (None = one group); norm_before_gate: norm(x) * silu(z) if True, else norm(x * silu(z))."""
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, **factory_kwargs))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the weight to ones."""
        torch.nn.init.ones_(self.weight)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        """x: (..., hidden_size); z: same shape or None. Returns x's shape and dtype."""
        return rmsnorm_fn(
            x,
            self.weight,
            self.bias,
            z=z,
            eps=self.eps,
            group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )


# --------------------------------------------------------------------------------------------
# fused training path (mamba_split_conv1d_scan_combined)
# --------------------------------------------------------------------------------------------


def mamba_split_conv1d_scan_combined(
    zxbcdt: Tensor,
    conv1d_weight: Tensor,
    conv1d_bias: Optional[Tensor],
    dt_bias: Tensor,
    A: Tensor,
    D: Tensor,
    chunk_size: int,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    dt_limit: Tuple[float, float] = _NO_DT_LIMIT,
    return_final_states: bool = False,
    activation: Optional[str] = "silu",
    rmsnorm_weight: Optional[Tensor] = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: Optional[Tensor] = None,
    outproj_bias: Optional[Tensor] = None,
    headdim: Optional[int] = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
):
    """Whole Mamba2 mixer core from the in-projection output; mamba-ssm's fused training path.

    The last dim of ``zxbcdt`` is laid out ``[zx0 | z | x B C | dt]`` with widths
    ``[2*d_nonssm, dim, dim + 2*ngroups*dstate, nheads]`` (``d_nonssm`` is normally 0; when
    positive, ``silu(zx0[:d_nonssm]) * zx0[d_nonssm:]`` is prepended to the output). ``xBC`` goes
    through the causal depthwise conv + activation, is split into x (nheads, headdim), B and C
    (ngroups, dstate), and runs through the SSD with ``dt_softplus=True``. Then:

    * ``rmsnorm_weight is None``: the SSD gates its own output, ``y * silu(z)``;
    * otherwise the SSD runs ungated and z gates a grouped RMSNorm (group size
      ``dim // ngroups``) before or after the norm according to ``norm_before_gate``;
    * ``outproj_weight`` given: a final ``F.linear(out, outproj_weight, outproj_bias)``.

    Args:
        zxbcdt: (batch, seqlen, 2*d_nonssm + 2*dim + 2*ngroups*dstate + nheads).
        conv1d_weight: (dim + 2*ngroups*dstate, width); dstate is inferred from it.
        conv1d_bias: (dim + 2*ngroups*dstate,) or None.
        dt_bias: (nheads,).
        A: (nheads,).
        D: (nheads, headdim) or (nheads,); nheads (and headdim if 2-D) are read from it.
        chunk_size: SSD chunk length.
        initial_states: (batch, nheads, headdim, dstate) SSM state, or None.
        seq_idx: (batch, seqlen) int ids of packed sequences (conv and SSD both respect them).
        dt_limit: (min, max) clamp of softplus(dt + dt_bias).
        return_final_states: also return the final SSM state.
        activation: conv activation, None / "silu" / "swish".
        rmsnorm_weight: (dim,) or None; rmsnorm_eps: its epsilon.
        outproj_weight: (out_dim, d_nonssm + dim) or None; outproj_bias: (out_dim,) or None.
        headdim: required when D is 1-D.
        ngroups: number of B/C groups.
        norm_before_gate: see above.

    Returns:
        out (batch, seqlen, d_nonssm + dim) (or out_dim after the projection) in zxbcdt's dtype
        (the projection follows autocast when enabled); with ``return_final_states`` the tuple
        (out, final_states), final_states (batch, nheads, headdim, dstate) in float32.
    """
    _check_activation(activation)
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim must be given when D is 1-D")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    batch, seqlen, width_in = zxbcdt.shape
    dim = nheads * headdim
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be divisible by ngroups ({ngroups})")
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (width_in - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    if d_nonssm < 0 or width_in != 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads:
        raise ValueError(
            f"zxbcdt last dim {width_in} does not fit dim={dim}, ngroups={ngroups}, "
            f"dstate={dstate}, nheads={nheads}"
        )
    if tuple(dt_bias.shape) != (nheads,) or tuple(A.shape) != (nheads,):
        raise ValueError(f"dt_bias and A must be ({nheads},)")
    if rmsnorm_weight is not None and tuple(rmsnorm_weight.shape) != (dim,):
        raise ValueError(f"rmsnorm_weight must be ({dim},), got {tuple(rmsnorm_weight.shape)}")
    if outproj_weight is None and outproj_bias is not None:
        raise ValueError("outproj_bias needs outproj_weight")

    zx0, z, xBC, dt = torch.split(
        zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1
    )
    cdt = _compute_dtype(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, initial_states)

    # Conv in compute precision (the kernel would round its output to zxbcdt's dtype here).
    xBC_conv = causal_conv1d_fn(
        xBC.transpose(1, 2).to(cdt),
        conv1d_weight,
        conv1d_bias,
        seq_idx=seq_idx,
        activation=activation,
    ).transpose(1, 2)
    x, B, C = torch.split(xBC_conv, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.reshape(batch, seqlen, nheads, headdim)
    B = B.reshape(batch, seqlen, ngroups, dstate)
    C = C.reshape(batch, seqlen, ngroups, dstate)
    z = z.reshape(batch, seqlen, nheads, headdim)

    dt_proc = _process_dt(dt, dt_bias, True, dt_limit, cdt)
    y, final_states, _ = _ssd_chunked(
        x,
        dt_proc,
        A,
        B,
        C,
        chunk_size,
        D,
        z if rmsnorm_weight is None else None,
        initial_states,
        seq_idx,
        None,
        cdt,
    )
    y = y.reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        y = rmsnorm_fn(
            y,
            rmsnorm_weight,
            None,
            z=z.reshape(batch, seqlen, dim),
            eps=rmsnorm_eps,
            group_size=dim // ngroups,
            norm_before_gate=norm_before_gate,
        )
    out = y.to(zxbcdt.dtype)
    if d_nonssm > 0:
        gate_in, up = zx0.chunk(2, dim=-1)
        out = torch.cat([(F.silu(gate_in.to(cdt)) * up.to(cdt)).to(zxbcdt.dtype), out], dim=-1)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return (out, final_states) if return_final_states else out
