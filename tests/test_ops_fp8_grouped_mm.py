"""FP8 grouped linear: quantisation, gradients against float32, and the kernel's operand rules."""

import pytest
import torch

from hybrid_megatron.ops import fp8_grouped_mm as f8


def _problem(counts, d_in=32, d_out=48, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = sum(counts)
    x = torch.randn(rows, d_in, generator=gen, dtype=torch.float32).to(dtype)
    # experts of very different magnitudes: a per-tensor scale would lose the small ones
    mags = torch.tensor([10.0**e for e in range(-2, -2 + len(counts))]).view(-1, 1, 1)
    w = (torch.randn(len(counts), d_out, d_in, generator=gen) * mags).to(dtype)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    return x, w, offsets


def _float_reference(x, w, offsets):
    out, start = [], 0
    for g, end in enumerate(offsets.tolist()):
        out.append(x[start:end].double() @ w[g].double().T)
        start = end
    return torch.cat(out)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def test_scales_are_powers_of_two_that_fit_e4m3():
    amax = torch.tensor([0.0, 1e-6, 0.3, 1.0, 447.0, 448.0, 1e5])
    scale = f8.power_of_two_scale(amax)
    assert torch.all(torch.log2(scale) == torch.round(torch.log2(scale)))
    assert torch.all(amax * scale <= f8.E4M3_MAX)
    assert torch.all(amax[1:] * scale[1:] > f8.E4M3_MAX / 2)  # the largest power of two that fits
    assert torch.isfinite(scale).all()


def test_forward_and_gradients_match_float32_within_e4m3_rounding():
    torch.manual_seed(0)
    x, w, offsets = _problem([16, 0, 32, 48])
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = f8.fp8_grouped_linear(x, w, offsets)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)

    xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    yr = _float_reference(xr, wr, offsets)
    yr.backward(grad_out.double())

    # E4M3 keeps 3 mantissa bits: about 3% error per element, less after summing a product
    assert _rel(y, yr) < 0.04
    assert _rel(x.grad, xr.grad) < 0.04
    for g in (0, 2, 3):  # every expert alone, so that the small ones are checked too
        assert _rel(w.grad[g], wr.grad[g]) < 0.04, g
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))  # an expert without tokens
    # and it is quantised: not the float32 result
    assert _rel(y, yr) > 1e-4


def test_padding_rows_past_the_last_group_change_nothing():
    x, w, offsets = _problem([16, 32])
    padded = torch.cat([x, torch.zeros(16, x.shape[1])])
    y = f8.fp8_grouped_linear(x, w, offsets)
    y_padded = f8.fp8_grouped_linear(padded, w, offsets)
    torch.testing.assert_close(y_padded[: x.shape[0]], y, rtol=0, atol=0)


def test_operands_follow_the_kernels_layout_rules(monkeypatch):
    """Every GEMM call's operands pass the CUDA kernel's own shape, dtype and stride checks
    (its meta implementation), so the layouts are right before a GPU sees them."""
    calls = []
    reference = f8._reference_grouped_mm

    def checked(a, b, scale_a, scale_b, offs, out_dtype):
        meta = [t.to("meta") if t is not None else None for t in (a, b, scale_a, scale_b, offs)]
        out = torch._scaled_grouped_mm(*meta[:4], offs=meta[4], out_dtype=torch.bfloat16)
        calls.append(tuple(out.shape))
        return reference(a, b, scale_a, scale_b, offs, out_dtype)

    monkeypatch.setattr(f8, "_reference_grouped_mm", checked)
    from hybrid_megatron.models.moe import padded_group_layout

    # the grouped experts' buffer for 26 routed rows in groups of 5, 0 and 21, padded to 16
    _, offsets, rows = padded_group_layout(torch.tensor([5, 0, 21]), 26, alignment=16)
    assert offsets.tolist() == [16, 16, 80] and rows == 80  # 26 + 3 x 15, rounded up to 16
    x = torch.randn(rows, 32, requires_grad=True)
    w = torch.randn(3, 64, 32, requires_grad=True)
    f8.fp8_grouped_linear(x, w, offsets).sum().backward()
    assert calls == [(80, 64), (80, 32), (3, 64, 32)]


def test_sizes_that_are_not_multiples_of_16_are_refused():
    x, w, offsets = _problem([16], d_in=24)
    with pytest.raises(ValueError, match="multiples of 16"):
        f8.fp8_grouped_linear(x, w, offsets)
