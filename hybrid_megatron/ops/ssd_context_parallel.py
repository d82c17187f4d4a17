"""The Mamba2 conv1d and SSD scan over a sequence split into segments held by different ranks.

Sequence-mode context parallelism: each rank holds some segments of every sequence (megatron-core
balances causal attention by giving rank r of R segments r and 2R-1-r of 2R equal ones) and
runs the conv and the scan on them locally. Two small exchanges make the result exact:

- conv1d: a causal conv of width w reads the w-1 inputs before each token, so every segment
  needs the last w-1 inputs that precede it in the sequence (its *halo*; zeros for the first);
- scan: each segment is scanned from a zero state. The true state entering segment k is
  ``h_in[k] = exp(a[k-1]) h_in[k-1] + final[k-1]`` (``a`` the segment's total log-decay
  ``sum_t dt_t A``, ``final`` its zero-start final state), and since the SSD is linear in its
  state, adding ``C_t . (exp(sum_{s<=t} dt_s A) h_in)`` to each output corrects it.

The stage functions below are pure tensor math on segments in sequence order; the two
``*_sequence_sharded`` functions chain them around a ``gather`` callable, one exchange each,
so they run unchanged with a process group (:func:`all_gather_autograd`) or without one.
Gradients flow back through the exchanges, so the backward pass is exact too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from hybrid_megatron.ops.causal_conv1d import causal_conv1d_fn
from hybrid_megatron.ops.ssd_chunked import mamba_chunk_scan_combined

__all__ = [
    "SequenceShards",
    "all_gather_autograd",
    "conv_tails",
    "conv_halos",
    "segment_log_decay",
    "incoming_states",
    "add_incoming_state",
    "causal_conv1d_sequence_sharded",
    "ssd_sequence_sharded",
]

Gather = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SequenceShards:
    """Which segments of the sequence every rank holds, and which rank this is.

    ``owned[r]`` lists the sequence positions (0 = first segment) of rank r's segments in the
    order the rank holds them; every rank holds the same number of equally long segments.
    """

    owned: tuple[tuple[int, ...], ...]
    rank: int

    @classmethod
    def load_balanced(cls, rank: int, world: int) -> SequenceShards:
        """megatron-core's context-parallel order: rank r holds segments r and 2*world-1-r."""
        return cls(tuple((r, 2 * world - 1 - r) for r in range(world)), rank)

    @property
    def mine(self) -> tuple[int, ...]:
        """This rank's segments, as sequence positions, in local order."""
        return self.owned[self.rank]

    @property
    def per_rank(self) -> int:
        """Segments each rank holds."""
        return len(self.owned[0])

    def to_sequence_order(self, gathered: Tensor) -> Tensor:
        """(ranks, per_rank, ...) as gathered -> (segments, ...) in sequence order."""
        flat = [pos for segs in self.owned for pos in segs]
        order = sorted(range(len(flat)), key=flat.__getitem__)
        index = torch.tensor(order, device=gathered.device)
        return gathered.flatten(0, 1).index_select(0, index)


class _AllGather(torch.autograd.Function):
    """all_gather along a new leading dim; the backward sums every rank's gradient of our slot."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, t, group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank used our tensor: its gradient is the sum over ranks of their slot ``rank``.
        # An all-reduce of the whole (small) stack keeps this to one collective gloo also has.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def all_gather_autograd(t: Tensor, group) -> Tensor:
    """Stack ``t`` from every rank of ``group`` (rank order) into (world, *t.shape); differentiable."""
    return _AllGather.apply(t, group)


def conv_tails(x: Tensor, width: int) -> Tensor:
    """The last width-1 inputs of each segment: (n, l, d) -> (n, width-1, d).

    A segment shorter than width-1 is zero-padded on the left; :func:`conv_halos` knows the
    lengths and takes only the real inputs.
    """
    keep = width - 1
    tail = x[:, max(x.shape[1] - keep, 0) :]
    return F.pad(tail, (0, 0, keep - tail.shape[1], 0))


def conv_halos(tails: Tensor, lengths: Sequence[int]) -> Tensor:
    """The inputs preceding each segment: tails (K, n, w-1, d) in sequence order -> (K, n, w-1, d).

    ``lengths[k]`` is segment k's length. A segment shorter than w-1 (even empty) passes on its
    predecessor's halo with its own inputs appended; before the first segment there are zeros.
    """
    keep = tails.shape[2]
    halo = torch.zeros_like(tails[0])
    halos = []
    for k in range(tails.shape[0]):
        halos.append(halo)
        real = min(lengths[k], keep)
        if real:
            halo = torch.cat([halo, tails[k][:, keep - real :]], dim=1)[:, real:]
    return torch.stack(halos)


def segment_log_decay(dt: Tensor, A: Tensor) -> Tensor:
    """``cumsum_t(dt_t A)`` over each segment: dt (n, l, h) processed, A (h,) -> (n, l, h).

    Entry t is the log of how much of the state entering the segment is left after token t; the
    last entry is the segment's total log-decay.
    """
    return (dt * A).cumsum(dim=1)


def incoming_states(total_log_decay: Tensor, final_states: Tensor) -> Tensor:
    """The state entering every segment, from each segment's zero-start scan.

    Takes (K, ..., h) total log-decays and (K, ..., h, p, n) zero-start final states, both in
    sequence order; returns (K, ..., h, p, n) with ``h_in[0] = 0`` and
    ``h_in[k] = exp(a[k-1]) h_in[k-1] + final[k-1]``.
    """
    state = torch.zeros_like(final_states[0])
    states = []
    for k in range(final_states.shape[0]):
        states.append(state)
        state = total_log_decay[k].exp()[..., None, None] * state + final_states[k]
    return torch.stack(states)


def add_incoming_state(y: Tensor, C: Tensor, log_decay: Tensor, state: Tensor) -> Tensor:
    """Outputs of a zero-start scan corrected for the state ``state`` entering the segment.

    y (n, l, h, p), C (n, l, g, n_state), log_decay (n, l, h) from :func:`segment_log_decay`,
    state (n, h, p, n_state); returns ``y_t + C_t . (exp(log_decay_t) state)`` in the state's
    dtype (head i reads group i // (h / g), as in the scan).
    """
    n, l, h, p = y.shape
    g = C.shape[2]
    grouped = state.unflatten(1, (g, h // g))  # (n, g, r, p, n_state)
    readout = torch.einsum("blgs,bgrps->blgrp", C.to(state.dtype), grouped).flatten(2, 3)
    return y.to(state.dtype) + readout * log_decay.exp().to(state.dtype)[..., None]


def _split_segments(t: Tensor, segments: int) -> Tensor:
    """(b, S*L, ...) -> (S*b, L, ...): the rank's segments stacked along the batch dim."""
    if t.shape[1] % segments:
        raise ValueError(f"{t.shape[1]} local tokens do not split into {segments} equal segments")
    return t.unflatten(1, (segments, t.shape[1] // segments)).transpose(0, 1).flatten(0, 1)


def _join_segments(t: Tensor, segments: int) -> Tensor:
    """(S*b, L, ...) -> (b, S*L, ...), the inverse of :func:`_split_segments`."""
    return t.unflatten(0, (segments, t.shape[0] // segments)).transpose(0, 1).flatten(1, 2)


def causal_conv1d_sequence_sharded(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str | None,
    shards: SequenceShards,
    gather: Gather,
    conv: Callable = causal_conv1d_fn,
) -> Tensor:
    """Causal depthwise conv of this rank's segments, with every segment's halo from its ranks.

    Args:
        x: (batch, S*L, dim), the rank's S segments of length L back to back, in local order.
        weight, bias, activation: as for ``causal_conv1d_fn``, weight (dim, width).
        shards: which segments every rank holds.
        gather: stacks a tensor from every rank, (ranks, *shape); differentiable.
        conv: the conv op (``causal_conv1d_fn``'s signature).

    Returns:
        (batch, S*L, dim) in x's dtype: the conv of the whole sequence at this rank's positions.
    """
    S = shards.per_rank
    width = weight.shape[1]
    seg = _split_segments(x, S)  # (S*b, L, d)
    if width > 1:
        tails = conv_tails(seg, width).unflatten(0, (S, -1))  # (S, b, w-1, d)
        lengths = [seg.shape[1]] * len(shards.owned) * S
        halos = conv_halos(shards.to_sequence_order(gather(tails)), lengths)
        mine = halos[list(shards.mine)].flatten(0, 1)  # (S*b, w-1, d)
        seg = torch.cat([mine.to(seg.dtype), seg], dim=1)
    out = conv(seg.transpose(1, 2), weight, bias, activation=activation)
    return _join_segments(out[..., width - 1 :].transpose(1, 2), S)


def ssd_sequence_sharded(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    shards: SequenceShards,
    gather: Gather,
    scan: Callable = mamba_chunk_scan_combined,
) -> Tensor:
    """The SSD scan at this rank's segments of a sequence, with the states of earlier segments.

    Args:
        x: (batch, S*L, nheads, headdim), the rank's S segments of length L, in local order.
        dt: (batch, S*L, nheads), already processed (bias, softplus and clamp applied).
        A: (nheads,). B, C: (batch, S*L, ngroups, dstate). D: (nheads,) or (nheads, headdim).
        chunk_size: the scan's chunk size.
        shards: which segments every rank holds.
        gather: stacks a tensor from every rank, (ranks, *shape); differentiable.
        scan: the chunked scan (``mamba_chunk_scan_combined``'s signature).

    Returns:
        (batch, S*L, nheads, headdim) in x's dtype: the scan of the whole sequence (zero initial
        state) at this rank's positions.
    """
    S = shards.per_rank
    xs, dts, Bs, Cs = (_split_segments(t, S) for t in (x, dt, B, C))
    y, final = scan(xs, dts, A, Bs, Cs, chunk_size, D=D, return_final_states=True)
    log_decay = segment_log_decay(dts.to(final.dtype), A.to(final.dtype))  # (S*b, L, h)
    # One exchange: each segment's zero-start final state and total log-decay, packed together.
    packed = torch.cat([final.flatten(-2), log_decay[:, -1, :, None]], dim=-1)  # (S*b, h, pn+1)
    everyone = shards.to_sequence_order(gather(packed.unflatten(0, (S, -1))))  # (K, b, h, pn+1)
    finals = everyone[..., :-1].unflatten(-1, final.shape[-2:])
    states = incoming_states(everyone[..., -1], finals)[list(shards.mine)].flatten(0, 1)
    y = add_incoming_state(y, Cs, log_decay, states)
    return _join_segments(y.to(x.dtype), S)
