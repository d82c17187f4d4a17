"""One recurrent SSM step for decoding, mamba-ssm's ``selective_state_update`` in torch ops.

Decoding advances the state one token at a time instead of rescanning the sequence; this is the
stand-in for mamba-ssm's Triton kernel where it is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid_megatron.ops._common import (
    compute_dtype,
    read_cache_rows,
    softplus,
    write_cache_rows,
    zero_padded_rows,
)

__all__ = ["selective_state_update"]


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: Tensor | None = None,
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

    cur, idx, valid = read_cache_rows(state_v, state_batch_indices, batch, ("state", "state_batch_indices"))

    cdt = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    dtv = dt4.to(cdt)
    if bias4 is not None:
        dtv = dtv + bias4.to(cdt)
    if dt_softplus:
        dtv = softplus(dtv)
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

    write_cache_rows(state_v, new.to(state.dtype), idx, valid)
    out = zero_padded_rows(out, valid).to(x.dtype)
    return out if has_heads else out.squeeze(1)
