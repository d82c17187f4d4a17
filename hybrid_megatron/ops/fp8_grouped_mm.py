"""Grouped linear layers in FP8 with row-wise scales: ``torch._scaled_grouped_mm`` with autograd.

``fp8_grouped_linear(x, weight, offsets)`` computes, for each group ``g`` of rows of ``x``
(``offsets`` are the groups' int32 end rows, as ``torch._grouped_mm`` takes them),
``x[rows of g] @ weight[g].T``, with all three GEMMs of training (forward, input gradient and
weight gradient) in E4M3. Scales are per row of each operand along the contraction dimension
(for the weight gradient, whose contraction runs over each group's rows, per column over all
rows: one dense reduction, where a per-group reduction needs contended atomics on a GPU) and
powers of two, so scaling is exact and only the rounding to E4M3 loses precision. Every scale
is computed on the device: nothing waits for the host, as in the BF16 grouped experts.

On a GPU the GEMMs are ``torch._scaled_grouped_mm`` (Hopper); elsewhere a reference with the
same quantisation and the same operand layouts (checked against the kernel's shape rules), so
the autograd wiring is testable on a CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


def power_of_two_scale(amax: Tensor) -> Tensor:
    """Float32 multipliers that map ``amax`` to at most E4M3's largest value, rounded down to
    powers of two (so the reciprocal that undoes them is exact); an all-zero row gets a finite one.

    Exact: with ``amax = m * 2**e`` (``m`` in [0.5, 1)), ``2**(9 - e)`` fits when ``m <= 448/512``,
    else ``2**(8 - e)`` (no rounded logarithm that could overshoot by one power)."""
    mantissa, exponent = torch.frexp(amax.float())
    power = torch.where(mantissa <= E4M3_MAX / 512, 9 - exponent, 8 - exponent)
    return torch.ldexp(torch.ones_like(mantissa), power)


def quantise(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``x`` in E4M3 with one power-of-two scale per slice along ``dim`` (the largest magnitude
    of each slice mapped into E4M3's range), and the reciprocal scales, float32, ``dim`` removed.

    Two passes over ``x`` in its own dtype (a max, then a scaled cast): a power-of-two multiplier
    is exact in bf16 as in float32, so nothing needs a float32 copy, and nothing exceeds the range."""
    x = x.detach()
    scale = power_of_two_scale(torch.linalg.vector_norm(x, float("inf"), dim=dim))
    return (x * scale.unsqueeze(dim).to(x.dtype)).to(E4M3), scale.reciprocal()


class QuantisedWeight(NamedTuple):
    """A ``[groups, out, in]`` weight in E4M3 for both of its GEMMs: ``forward`` ``[groups, out,
    in]`` scaled per (group, out) row, ``backward`` ``[groups, in, out]`` row-major scaled per
    (group, in); ``*_scale_inv`` undo the scales. Computing them once per optimizer step, not per
    micro-batch, is what TE's FP8 weight cache does too."""

    forward: Tensor
    forward_scale_inv: Tensor
    backward: Tensor
    backward_scale_inv: Tensor


def quantise_weight(weight: Tensor) -> QuantisedWeight:
    """Both E4M3 copies of a ``[groups, out, in]`` weight (see :class:`QuantisedWeight`)."""
    forward, forward_scale_inv = quantise(weight, dim=2)
    backward, backward_scale_inv = quantise(weight, dim=1)
    return QuantisedWeight(
        forward, forward_scale_inv, backward.transpose(1, 2).contiguous(), backward_scale_inv
    )


def _reference_grouped_mm(a, b, scale_a, scale_b, offs, out_dtype):
    """What ``torch._scaled_grouped_mm`` computes, in float32, for the two layouts used here:
    2d x 3d (groups of rows of ``a``) and 2d x 2d (groups along the contraction dimension)."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if b.dim() == 3:
        out = torch.zeros(a.shape[0], b.shape[2], dtype=torch.float32, device=a.device)
        for g, (s, e) in enumerate(zip(starts, ends, strict=True)):
            lhs = a[s:e].float() * scale_a[s:e, None]
            out[s:e] = lhs @ (b[g].float() * scale_b[g][None, :])
        return out.to(out_dtype)
    m, n = a.shape[0], b.shape[1]
    out = torch.zeros(len(ends), m, n, dtype=torch.float32, device=a.device)
    for g, (s, e) in enumerate(zip(starts, ends, strict=True)):
        lhs = a[:, s:e].float() * scale_a[g * m : (g + 1) * m, None]
        out[g] = lhs @ (b[s:e].float() * scale_b[g * n : (g + 1) * n][None, :])
    return out.to(out_dtype)


def scaled_grouped_mm(a, b, scale_a, scale_b, offs, out_dtype, fast_accum: bool) -> Tensor:
    """``torch._scaled_grouped_mm`` on CUDA, the float32 reference elsewhere (same arguments)."""
    if a.is_cuda:
        return torch._scaled_grouped_mm(
            a, b, scale_a, scale_b, offs=offs, out_dtype=out_dtype, use_fast_accum=fast_accum
        )
    return _reference_grouped_mm(a, b, scale_a, scale_b, offs, out_dtype)


class _FP8GroupedLinear(torch.autograd.Function):
    """y = x @ weight[g].T per group, the three GEMMs in E4M3 with row-wise power-of-two scales.

    Operand layouts follow the kernel's rule (left operand row-major, right column-major): a
    ``[groups, out, in]`` row-major tensor viewed as ``transpose(1, 2)`` is column-major.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offsets: Tensor, *quantised: Tensor) -> Tensor:
        w = QuantisedWeight(*quantised)
        x8, x_scale_inv = quantise(x, dim=1)  # per row, along ``in``
        ctx.save_for_backward(x, offsets, w.backward, w.backward_scale_inv)
        ctx.weight_dtype = weight.dtype
        # the forward GEMM accumulates fast, as TE's default FP8 recipe does; gradients do not
        return scaled_grouped_mm(
            x8, w.forward.transpose(1, 2), x_scale_inv, w.forward_scale_inv, offsets, x.dtype, True
        )

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, offsets, w_backward, w_backward_scale_inv = ctx.saved_tensors
        grad = grad.contiguous()
        groups = w_backward.shape[0]

        # input gradient: grad [rows, out] @ weight[g] [out, in], scaled along ``out``
        g8, g_scale_inv = quantise(grad, dim=1)
        grad_x = scaled_grouped_mm(
            g8, w_backward.transpose(1, 2), g_scale_inv, w_backward_scale_inv, offsets, x.dtype, False
        )

        # weight gradient: grad[rows of g].T @ x[rows of g], contracting over the group's rows.
        # Each operand is scaled per column, over all rows: finer than a per-tensor scale, and a
        # dense reduction (the kernel takes one scale per group and column, so it is repeated).
        gt8, gc_scale_inv = quantise(grad, dim=0)
        xt8, xc_scale_inv = quantise(x, dim=0)
        grad_w = scaled_grouped_mm(
            gt8.t().contiguous(),  # [out, rows]
            xt8.t().contiguous().t(),  # [rows, in], column-major
            gc_scale_inv.repeat(groups),
            xc_scale_inv.repeat(groups),
            offsets,
            ctx.weight_dtype,
            False,
        )
        # a group without rows contracts over nothing: its gradient is zero, whatever the kernel writes
        sizes = torch.diff(offsets, prepend=offsets.new_zeros(1))
        grad_w = torch.where((sizes > 0)[:, None, None], grad_w, torch.zeros_like(grad_w))
        return grad_x, grad_w, None, None, None, None, None


def fp8_grouped_linear(
    x: Tensor, weight: Tensor, offsets: Tensor, quantised: QuantisedWeight | None = None
) -> Tensor:
    """``x @ weight[g].T`` for each group of rows of ``x`` [rows, in] (``offsets``: int32 end
    row of each group; on a GPU each, and ``rows``, a multiple of 16), ``weight`` [groups, out, in]; returns
    ``[rows, out]`` in ``x``'s dtype. ``in`` and ``out`` must be multiples of 16. ``quantised``:
    ``quantise_weight(weight)`` computed earlier (reused across micro-batches), else computed here;
    the weight's gradient flows to ``weight`` either way."""
    if x.is_cuda and x.shape[0] % 16:
        # the weight gradient's operands are the transposed rows: 16-byte row strides
        raise ValueError(
            f"FP8 grouped GEMM on a GPU needs a row count that is a multiple of 16, got {x.shape[0]}"
        )
    if x.shape[1] % 16 or weight.shape[1] % 16:
        raise ValueError(
            f"FP8 grouped GEMM needs in/out sizes that are multiples of 16, got {tuple(weight.shape[1:])}"
        )
    if quantised is None:
        quantised = quantise_weight(weight)
    return _FP8GroupedLinear.apply(x, weight, offsets, *quantised)
