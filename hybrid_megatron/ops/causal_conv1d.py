"""Causal depthwise conv1d and its decode step, causal-conv1d's API in torch ops.

Stand-ins for ``causal_conv1d_fn``, ``causal_conv1d_update`` and ``causal_conv1d_varlen_states``
of causal-conv1d 1.7, so megatron-core's MambaMixer runs where that CUDA extension is missing.
Arithmetic is in float32 (float64 for float64 inputs); results come back in x's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybrid_megatron.ops._common import (
    activate,
    check_activation,
    compute_dtype,
    read_cache_rows,
    write_cache_rows,
    zero_padded_rows,
)

__all__ = ["causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_varlen_states"]


def _depthwise_causal_taps(window: Tensor, weight: Tensor, bias: Tensor | None, out_len: int) -> Tensor:
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
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: Tensor | None = None,
    activation: str | None = None,
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
    check_activation(activation)
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

    cdt = compute_dtype(x, weight, bias, initial_states)
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
    out = activate(out, activation)
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


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: Tensor | None = None,
    conv_state_indices: Tensor | None = None,
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
    check_activation(activation)
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

    state, idx, valid = read_cache_rows(
        conv_state, conv_state_indices, batch, ("conv_state", "conv_state_indices")
    )

    cdt = compute_dtype(x, weight, bias, conv_state)
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
    out = _depthwise_causal_taps(window, weight.to(cdt), bias.to(cdt) if bias is not None else None, seqlen)
    out = activate(out, activation)

    write_cache_rows(conv_state, new_state, idx, valid)
    out = zero_padded_rows(out, valid).to(x.dtype)
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
