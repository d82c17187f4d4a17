"""The SSD in its shortest readable form: the quadratic ("attention-like") form over the sequence.

The reference the chunked scan (:mod:`hybrid_megatron.ops.ssd_chunked`) is tested against: no
chunks, no padding, no dtype handling, so each line can be checked against the formula. It costs
O(seqlen^2) memory and is meant for tests and for reading, not for training.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ssd_minimal"]


def ssd_minimal(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Outputs and final state of the SSD, by the quadratic form; the tests' reference.

    Per head the recurrence ``H_t = exp(dt_t A) H_{t-1} + dt_t x_t B_t^T``, ``y_t = H_t C_t``
    is evaluated in closed form::

        y_t = sum_{s <= t} (C_t . B_s) exp(dt_{s+1} A + ... + dt_t A) dt_s x_s
              + exp(dt_0 A + ... + dt_t A) H_{-1} C_t

    Args:
        x: (batch, seqlen, nheads, headdim).
        dt: (batch, seqlen, nheads), already processed (bias, softplus and clamp applied).
        A: (nheads,).
        B, C: (batch, seqlen, ngroups, dstate); head i uses group ``i // (nheads // ngroups)``.
        initial_states: (batch, nheads, headdim, dstate) state ``H_{-1}``, or None for zeros.
        seq_idx: (batch, seqlen) int ids of packed sequences; the state is reset wherever the id
            changes, the state before token 0 counting as id 0.

    Returns:
        (y (batch, seqlen, nheads, headdim), final state H_{seqlen-1} (batch, nheads, headdim,
        dstate)), computed in the inputs' dtype.
    """
    b, l, h, p = x.shape
    heads_per_group = h // B.shape[2]
    B = B.repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
    C = C.repeat_interleave(heads_per_group, dim=2)

    # log_decay[b, h, t, s] = dt_{s+1} A + ... + dt_t A, the log of how much of token s's
    # contribution is left at token t.
    cum = (dt * A).cumsum(dim=1).transpose(1, 2)  # (b, h, l)
    log_decay = cum[..., :, None] - cum[..., None, :]
    visible = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()  # s <= t
    reaches_start = torch.ones(b, 1, l, dtype=torch.bool, device=x.device)
    if seq_idx is not None:
        previous = torch.cat([torch.zeros_like(seq_idx[:, :1]), seq_idx[:, :-1]], dim=1)
        segment = (seq_idx != previous).cumsum(dim=1)  # (b, l): which run of equal ids
        visible = visible & (segment[:, :, None] == segment[:, None, :])[:, None]
        reaches_start = (segment == 0)[:, None, :]
    # Masking before exp keeps the (positive, possibly huge) upper triangle from overflowing.
    L = log_decay.masked_fill(~visible, float("-inf")).exp()  # (b, h, t, s)

    scores = torch.einsum("bthn,bshn->bhts", C, B) * L
    y = torch.einsum("bhts,bsh,bshp->bthp", scores, dt, x)
    # The final state is what row t = l-1 of L keeps of every token, before reading out with C.
    final = torch.einsum("bhs,bsh,bshp,bshn->bhpn", L[:, :, -1], dt, x, B)

    if initial_states is not None:
        start_decay = cum.exp() * reaches_start  # (b, h, l): what is left of H_{-1} at t
        y = y + torch.einsum("bthn,bhpn,bht->bthp", C, initial_states, start_decay)
        final = final + initial_states * start_decay[:, :, -1, None, None]
    return y, final
