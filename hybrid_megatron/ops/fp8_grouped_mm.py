"""Grouped linear layers in FP8: ``torch._scaled_grouped_mm`` with autograd.

``fp8_grouped_linear(x, weight, offsets)`` computes, for each group ``g`` of rows of ``x``
(``offsets`` are the groups' int32 end rows, as ``torch._grouped_mm`` takes them),
``x[rows of g] @ weight[g].T``, with all three GEMMs of training (forward, input gradient and
weight gradient) in E4M3. Every scale is a power of two, so scaling is exact and only the
rounding to E4M3 loses precision, and every scale is computed on the device: nothing waits for
the host, as in the BF16 grouped experts.

The weights are scaled per row along the contraction dimension (:func:`quantise_weight`, made
once per optimizer step by the caller). The activations and gradients go through a
:class:`Quantiser`, which makes a tensor's row-wise copy and its transposed copy (the weight
gradient's operands: Hopper's FP8 GEMMs read both operands K-major) together:

- :class:`TEQuantiser`, on a GPU where Transformer Engine is installed: TE's per-tensor current
  scaling, one amax pass and one fused cast-transpose (about 6 bytes moved per bf16 element for
  both copies);
- :class:`TorchQuantiser`, everywhere else and the reference: torch ops with one scale per row
  (row-wise copy) and per column (transposed copy), finer than per tensor but several passes
  and a strided transpose (about 20 bytes per element).

The forward keeps only ``x``'s transposed FP8 copy for the backward (1 byte per element, where
``x`` itself would be 2). On a GPU the GEMMs are ``torch._scaled_grouped_mm`` (Hopper);
elsewhere a reference with the same operand layouts (checked against the kernel's shape
rules), so the autograd wiring is testable on a CPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Protocol

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


class QuantisedOperand(NamedTuple):
    """A ``[rows, cols]`` tensor in E4M3 for the GEMMs it feeds: ``rowwise`` ``[rows, cols]``
    with ``rowwise_scale_inv`` ``[rows]``, and ``columnwise``, its transpose ``[cols, rows]``
    row-major, with ``columnwise_scale_inv`` ``[cols]`` (one reciprocal scale per row of each,
    float32, contiguous, as ``torch._scaled_grouped_mm`` takes them). A copy not asked for is
    None, as is its scale."""

    rowwise: Tensor | None
    rowwise_scale_inv: Tensor | None
    columnwise: Tensor | None
    columnwise_scale_inv: Tensor | None


class Quantiser(Protocol):
    """Quantises an activation or gradient ``[rows, cols]`` into the copies asked for."""

    def __call__(self, x: Tensor, *, rowwise: bool, columnwise: bool) -> QuantisedOperand: ...


class TorchQuantiser:
    """Power-of-two scales in torch ops, one per row of each copy (per row of ``x`` for the
    row-wise copy, per column for the transposed one): the reference, on any device."""

    def __call__(self, x: Tensor, *, rowwise: bool, columnwise: bool) -> QuantisedOperand:
        data, scale_inv = quantise(x, dim=1) if rowwise else (None, None)
        data_t, scale_inv_t = None, None
        if columnwise:
            by_column, scale_inv_t = quantise(x, dim=0)
            data_t = by_column.t().contiguous()
        return QuantisedOperand(data, scale_inv, data_t, scale_inv_t)


class TEQuantiser:
    """Transformer Engine's per-tensor current scaling (CUDA tensors only): one amax pass, then
    one fused kernel that casts and writes the row-wise copy and its transpose together.

    One scale for the whole tensor (TE's default FP8 practice for activations and gradients),
    repeated to the per-row scale vectors the grouped GEMM takes. ``force_pow_2_scales``: the
    scale TE computes (E4M3's largest value over the amax) rounded down to a power of two, the
    same scale :func:`power_of_two_scale` gives, so scaling stays exact here as on the
    reference path; an all-zero tensor gets scale 1. Transformer Engine is imported on the
    first call."""

    def __call__(self, x: Tensor, *, rowwise: bool, columnwise: bool) -> QuantisedOperand:
        import transformer_engine_torch as tex
        from transformer_engine.pytorch.tensor.float8_tensor import Float8CurrentScalingQuantizer

        quantizer = Float8CurrentScalingQuantizer(
            tex.DType.kFloat8E4M3,
            x.device,
            rowwise=rowwise,
            columnwise=columnwise,
            force_pow_2_scales=True,
        )
        quantizer.internal = True  # a plain storage object, outside autograd
        q = quantizer(x.detach().contiguous())  # uint8 ``_data`` [rows, cols], ``_scale_inv`` [1]
        rows, cols = x.shape
        transpose = None
        if columnwise:
            # Hopper's FP8 GEMMs are TN only, so there TE writes the transpose [cols, rows] in
            # the same kernel; where its GEMMs take either layout (Blackwell) it writes none
            transpose = q._transpose if q._transpose is not None else q._data.t().contiguous()
        scale_inv = q._scale_inv
        return QuantisedOperand(
            q._data.view(E4M3) if rowwise else None,
            scale_inv.expand(rows).contiguous() if rowwise else None,
            transpose.view(E4M3) if transpose is not None else None,
            scale_inv.expand(cols).contiguous() if columnwise else None,
        )


@functools.cache
def have_transformer_engine() -> bool:
    """Whether Transformer Engine's PyTorch package imports here (asked once: every FP8 expert
    GEMM picks its quantiser, and a failed import searches the file system each time)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def default_quantiser(device: torch.device) -> Quantiser:
    """TE's fused quantiser for a CUDA ``device`` where Transformer Engine is installed, the
    torch reference elsewhere."""
    if device.type == "cuda" and have_transformer_engine():
        return TEQuantiser()
    return TorchQuantiser()


class _FP8GroupedLinear(torch.autograd.Function):
    """y = x @ weight[g].T per group, the three GEMMs in E4M3.

    Operand layouts follow the kernel's rule (left operand row-major, right column-major): a
    ``[groups, out, in]`` row-major tensor viewed as ``transpose(1, 2)`` is column-major, and
    so is a ``[cols, rows]`` transposed copy viewed as ``.t()``.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        offsets: Tensor,
        quantiser: Quantiser,
        weight_grad: bool,
        every_group_has_rows: bool,
        *quantised: Tensor,
    ) -> Tensor:
        w = QuantisedWeight(*quantised)
        # both copies in one go: the row-wise one for this GEMM, the transposed one (the weight
        # gradient's operand, if one is wanted) kept for the backward instead of ``x``
        xq = quantiser(x, rowwise=True, columnwise=weight_grad)
        ctx.save_for_backward(
            xq.columnwise, xq.columnwise_scale_inv, offsets, w.backward, w.backward_scale_inv
        )
        ctx.quantiser = quantiser
        ctx.weight_grad = weight_grad
        ctx.every_group_has_rows = every_group_has_rows
        ctx.x_dtype = x.dtype
        ctx.weight_dtype = weight.dtype
        # the forward GEMM accumulates fast, as TE's default FP8 recipe does; gradients do not
        return scaled_grouped_mm(
            xq.rowwise,
            w.forward.transpose(1, 2),
            xq.rowwise_scale_inv,
            w.forward_scale_inv,
            offsets,
            x.dtype,
            True,
        )

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_t, x_t_scale_inv, offsets, w_backward, w_backward_scale_inv = ctx.saved_tensors
        groups = w_backward.shape[0]
        gq = ctx.quantiser(grad.contiguous(), rowwise=True, columnwise=ctx.weight_grad)

        # input gradient: grad [rows, out] @ weight[g] [out, in], contracting over ``out``
        grad_x = scaled_grouped_mm(
            gq.rowwise,
            w_backward.transpose(1, 2),
            gq.rowwise_scale_inv,
            w_backward_scale_inv,
            offsets,
            ctx.x_dtype,
            False,
        )
        if not ctx.weight_grad:
            return grad_x, None, None, None, None, None, None, None, None, None

        # weight gradient: grad[rows of g].T @ x[rows of g], contracting over the group's rows:
        # the transposed copies, one scale per row of each and group (so the scales repeat)
        grad_w = scaled_grouped_mm(
            gq.columnwise,  # [out, rows]
            x_t.t(),  # [rows, in], column-major
            gq.columnwise_scale_inv.repeat(groups),
            x_t_scale_inv.repeat(groups),
            offsets,
            ctx.weight_dtype,
            False,
        )
        if not ctx.every_group_has_rows:
            # a group without rows contracts over nothing: its gradient is zero, whatever the kernel writes
            sizes = torch.diff(offsets, prepend=offsets.new_zeros(1))
            grad_w = torch.where((sizes > 0)[:, None, None], grad_w, 0.0)  # one pass, no zeros tensor
        return grad_x, grad_w, None, None, None, None, None, None, None, None


def fp8_grouped_linear(
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    quantised: QuantisedWeight | None = None,
    quantiser: Quantiser | None = None,
    every_group_has_rows: bool = False,
) -> Tensor:
    """``x @ weight[g].T`` for each group of rows of ``x`` [rows, in] (``offsets``: int32 end
    row of each group; on a GPU each, and ``rows``, a multiple of 16), ``weight`` [groups, out, in]; returns
    ``[rows, out]`` in ``x``'s dtype. ``in`` and ``out`` must be multiples of 16. ``quantised``:
    ``quantise_weight(weight)`` computed earlier (reused across micro-batches), else computed here;
    the weight's gradient flows to ``weight`` either way. ``quantiser`` quantises ``x`` and the
    output's gradient: :func:`default_quantiser` for ``x``'s device unless given.
    ``every_group_has_rows``: the caller promises no group is empty, which spares the weight
    gradient a pass that zeroes empty groups' blocks (the kernel leaves them undefined)."""
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
    if quantiser is None:
        quantiser = default_quantiser(x.device)
    # the transposed copies only where a weight gradient will be asked for (not in evaluation)
    weight_grad = torch.is_grad_enabled() and weight.requires_grad
    return _FP8GroupedLinear.apply(
        x, weight, offsets, quantiser, weight_grad, every_group_has_rows, *quantised
    )
