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

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


def power_of_two_scale(amax: Tensor) -> Tensor:
    """Float32 multipliers that map ``amax`` to at most E4M3's largest value, rounded down to
    powers of two (so the reciprocal that undoes them is exact); an all-zero row gets a finite one."""
    ratio = E4M3_MAX / amax.float().clamp(min=1e-12)
    return torch.exp2(torch.floor(torch.log2(ratio)))


def to_e4m3(x: Tensor, scale: Tensor) -> Tensor:
    """``x * scale`` rounded to E4M3, saturating at its largest value."""
    return (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def to_e4m3_transposed(x: Tensor, scale: Tensor) -> Tensor:
    """``(x * scale).T`` rounded to E4M3 and row-major (the transpose is done in float32)."""
    return (x.float() * scale).t().contiguous().clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)


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

    Operand layouts follow the kernel's rule (left operand row-major, right column-major):
    a ``[experts, out, in]`` weight viewed as ``transpose(1, 2)`` is already column-major.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
        x_scale = power_of_two_scale(x.detach().abs().amax(dim=1))  # [rows]
        w_scale = power_of_two_scale(weight.detach().abs().amax(dim=2))  # [experts, out]
        x8 = to_e4m3(x, x_scale[:, None])
        w8 = to_e4m3(weight, w_scale[:, :, None])
        ctx.save_for_backward(x, weight, offsets)
        # the forward GEMM accumulates fast, as TE's default FP8 recipe does; gradients do not
        return scaled_grouped_mm(
            x8, w8.transpose(1, 2), x_scale.reciprocal(), w_scale.reciprocal(), offsets, x.dtype, True
        )

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        groups = weight.shape[0]

        # input gradient: grad [rows, out] @ weight[g] [out, in], scaled along ``out``
        g_scale = power_of_two_scale(grad.abs().amax(dim=1))  # [rows]
        wt_scale = power_of_two_scale(weight.detach().abs().amax(dim=1))  # [experts, in]
        g8 = to_e4m3(grad, g_scale[:, None])
        wt8 = (weight.detach().float().transpose(1, 2) * wt_scale[:, :, None]).contiguous()
        wt8 = wt8.clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)  # [experts, in, out] row-major
        grad_x = scaled_grouped_mm(
            g8, wt8.transpose(1, 2), g_scale.reciprocal(), wt_scale.reciprocal(), offsets, x.dtype, False
        )

        # weight gradient: grad[rows of g].T @ x[rows of g], contracting over the group's rows.
        # Each operand is scaled per column, over all rows: finer than a per-tensor scale, and a
        # dense reduction (the kernel takes one scale per group and column, so it is repeated).
        gc_scale = power_of_two_scale(grad.abs().amax(dim=0))  # [out]
        xc_scale = power_of_two_scale(x.detach().abs().amax(dim=0))  # [in]
        gt8 = to_e4m3_transposed(grad, gc_scale)  # [out, rows]
        xt8 = to_e4m3_transposed(x.detach(), xc_scale)  # [in, rows]
        grad_w = scaled_grouped_mm(
            gt8,
            xt8.t(),
            gc_scale.reciprocal().repeat(groups),
            xc_scale.reciprocal().repeat(groups),
            offsets,
            weight.dtype,
            False,
        )
        # a group without rows contracts over nothing: its gradient is zero, whatever the kernel writes
        sizes = torch.diff(offsets, prepend=offsets.new_zeros(1))
        grad_w = torch.where((sizes > 0)[:, None, None], grad_w, torch.zeros_like(grad_w))
        return grad_x, grad_w, None


def fp8_grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """``x @ weight[g].T`` for each group of rows of ``x`` [rows, in] (``offsets``: int32 end
    row of each group; on a GPU each, and ``rows``, a multiple of 16), ``weight`` [groups, out, in]; returns
    ``[rows, out]`` in ``x``'s dtype. ``in`` and ``out`` must be multiples of 16."""
    if x.is_cuda and x.shape[0] % 16:
        # the weight gradient's operands are the transposed rows: 16-byte row strides
        raise ValueError(
            f"FP8 grouped GEMM on a GPU needs a row count that is a multiple of 16, got {x.shape[0]}"
        )
    if x.shape[1] % 16 or weight.shape[1] % 16:
        raise ValueError(
            f"FP8 grouped GEMM needs in/out sizes that are multiples of 16, got {tuple(weight.shape[1:])}"
        )
    return _FP8GroupedLinear.apply(x, weight, offsets)
