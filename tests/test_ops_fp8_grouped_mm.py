"""FP8 grouped linear: quantisation, gradients against float32, and the kernel's operand rules."""

import pytest
import torch

from hybrid_megatron.ops import fp8_grouped_mm as f8


class TensorwiseQuantiser:
    """The quantiser interface with one power-of-two scale per tensor, repeated per row: the
    numbers of :class:`~hybrid_megatron.ops.fp8_grouped_mm.TEQuantiser` (TE's current scaling
    with power-of-two scales) in torch ops, for checks where TE is not at hand."""

    def __call__(self, x, *, rowwise, columnwise):
        data, scale_inv = f8.quantise(x.reshape(1, -1), dim=1)
        data = data.view_as(x)
        rows, cols = x.shape
        return f8.QuantisedOperand(
            data if rowwise else None,
            scale_inv.expand(rows).contiguous() if rowwise else None,
            data.t().contiguous() if columnwise else None,
            scale_inv.expand(cols).contiguous() if columnwise else None,
        )


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


def _check_operands_like_the_kernel(monkeypatch) -> list[tuple[int, ...]]:
    """From here on every reference GEMM first passes its operands through the CUDA kernel's
    own shape, dtype and stride checks (its meta implementation); returns the output shapes."""
    calls = []
    reference = f8._reference_grouped_mm

    def checked(a, b, scale_a, scale_b, offs, out_dtype):
        meta = [t.to("meta") if t is not None else None for t in (a, b, scale_a, scale_b, offs)]
        out = torch._scaled_grouped_mm(*meta[:4], offs=meta[4], out_dtype=torch.bfloat16)
        calls.append(tuple(out.shape))
        return reference(a, b, scale_a, scale_b, offs, out_dtype)

    monkeypatch.setattr(f8, "_reference_grouped_mm", checked)
    return calls


@pytest.mark.parametrize("quantiser", ["torch", "tensorwise"])
def test_operands_follow_the_kernels_layout_rules(monkeypatch, quantiser):
    """Every GEMM call's operands pass the CUDA kernel's own checks, so the layouts are right
    before a GPU sees them; also with one scale per tensor repeated per row (TE's shape)."""
    calls = _check_operands_like_the_kernel(monkeypatch)
    from hybrid_megatron.models.moe import padded_group_layout

    # the grouped experts' buffer for 26 routed rows in groups of 5, 0 and 21, padded to 16 (the
    # empty group too)
    _, offsets, rows = padded_group_layout(torch.tensor([5, 0, 21]), 26, alignment=16)
    assert offsets.tolist() == [16, 32, 80] and rows == 80  # 26 + 3 x 16, rounded up to 16
    x = torch.randn(rows, 32, requires_grad=True)
    w = torch.randn(3, 64, 32, requires_grad=True)
    q = f8.TorchQuantiser() if quantiser == "torch" else TensorwiseQuantiser()
    f8.fp8_grouped_linear(x, w, offsets, quantiser=q).sum().backward()
    assert calls == [(80, 64), (80, 32), (3, 64, 32)]


def test_sizes_that_are_not_multiples_of_16_are_refused():
    x, w, offsets = _problem([16], d_in=24)
    with pytest.raises(ValueError, match="multiples of 16"):
        f8.fp8_grouped_linear(x, w, offsets)


def test_default_quantiser_is_transformer_engines_on_cuda_only(monkeypatch):
    """TE's fused quantiser where it can run (a CUDA tensor, TE installed), the torch reference
    elsewhere; choosing one imports nothing."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(f8, "have_transformer_engine", lambda: True)
    assert isinstance(f8.default_quantiser(cpu), f8.TorchQuantiser)
    assert isinstance(f8.default_quantiser(cuda), f8.TEQuantiser)
    monkeypatch.setattr(f8, "have_transformer_engine", lambda: False)
    assert isinstance(f8.default_quantiser(cuda), f8.TorchQuantiser)


def test_transformer_engine_is_found_when_installed():
    import importlib.util

    installed = importlib.util.find_spec("transformer_engine") is not None
    assert f8.have_transformer_engine() == installed


def test_torch_quantiser_writes_the_copies_asked_for():
    """Row-wise copy scaled per row, transposed copy [cols, rows] row-major scaled per column;
    each within E4M3's rounding (3 mantissa bits) of the input."""
    x = torch.randn(48, 32) * torch.logspace(-3, 3, 48)[:, None]  # rows of very different sizes
    q = f8.TorchQuantiser()(x, rowwise=True, columnwise=True)
    assert q.rowwise.shape == (48, 32) and q.rowwise_scale_inv.shape == (48,)
    assert q.columnwise.shape == (32, 48) and q.columnwise.is_contiguous()
    assert q.columnwise_scale_inv.shape == (32,)
    rows = q.rowwise.float() * q.rowwise_scale_inv[:, None]
    cols = (q.columnwise.float() * q.columnwise_scale_inv[:, None]).t()
    torch.testing.assert_close(rows, x, rtol=2**-4, atol=0)
    # per column, a row 10^6 times smaller than the column's largest falls below E4M3's range
    big = x.abs() > x.abs().amax(dim=0) * 1e-2
    torch.testing.assert_close(cols[big], x[big], rtol=2**-4, atol=0)
    assert q.columnwise.dtype == q.rowwise.dtype == f8.E4M3
    only_rows = f8.TorchQuantiser()(x, rowwise=True, columnwise=False)
    assert only_rows.columnwise is None and only_rows.columnwise_scale_inv is None
    assert torch.equal(only_rows.rowwise.view(torch.uint8), q.rowwise.view(torch.uint8))


class _Recording:
    """Wraps a quantiser and records (shape, rowwise, columnwise) of each call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, x, *, rowwise, columnwise):
        self.calls.append((tuple(x.shape), rowwise, columnwise))
        return self.inner(x, rowwise=rowwise, columnwise=columnwise)


def test_each_tensor_is_quantised_once_with_the_copies_its_gemms_need():
    """Training: ``x`` once (both copies, the transposed one kept for the weight gradient) and
    the output's gradient once (both copies); the given quantiser gives the default's numbers
    on a CPU. Evaluation and a frozen weight make no transposed copies."""
    x, w, offsets = _problem([16, 0, 32])
    grad_out = torch.randn(48, 48)
    results = {}
    for name, q in (("default", None), ("given", _Recording(f8.TorchQuantiser()))):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = f8.fp8_grouped_linear(xs, ws, offsets, quantiser=q)
        y.backward(grad_out)
        results[name] = (y, xs.grad, ws.grad)
    for got, want in zip(results["given"], results["default"], strict=True):
        assert torch.equal(got, want)
    assert q.calls == [((48, 32), True, True), ((48, 48), True, True)]

    q = _Recording(f8.TorchQuantiser())
    ws = w.clone().requires_grad_()
    with torch.no_grad():
        y = f8.fp8_grouped_linear(x, ws, offsets, quantiser=q)
    assert torch.equal(y, results["default"][0])
    assert q.calls == [((48, 32), True, False)]

    q = _Recording(f8.TorchQuantiser())
    xs, frozen = x.clone().requires_grad_(), w.detach()
    f8.fp8_grouped_linear(xs, frozen, offsets, quantiser=q).backward(grad_out)
    assert q.calls == [((48, 32), True, False), ((48, 48), True, False)]
    assert torch.equal(xs.grad, results["default"][1]) and frozen.grad is None


def test_one_scale_per_tensor_gives_gradients_within_e4m3_rounding():
    """The autograd wiring with TE's shape of scales (one per tensor, repeated per row):
    forward and all three gradients within E4M3's rounding of float64; an expert without rows
    gets a zero gradient; an all-zero input gives zero outputs and weight gradients."""
    gen = torch.Generator().manual_seed(1)
    offsets = torch.tensor([16, 16, 48, 64], dtype=torch.int32)
    x = torch.randn(64, 32, generator=gen).requires_grad_()
    w = (torch.randn(4, 48, 32, generator=gen) * 0.05).requires_grad_()
    grad_out = torch.randn(64, 48, generator=gen)
    y = f8.fp8_grouped_linear(x, w, offsets, quantiser=TensorwiseQuantiser())
    y.backward(grad_out)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    _float_reference(xr, wr, offsets).backward(grad_out.double())
    for got, want in ((y, _float_reference(xr, wr, offsets)), (x.grad, xr.grad)):
        assert 1e-4 < _rel(got, want) < 0.04
    for g in (0, 2, 3):
        assert _rel(w.grad[g], wr.grad[g]) < 0.04, g
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))

    zeros = torch.zeros_like(x).requires_grad_()
    w.grad = None
    y = f8.fp8_grouped_linear(zeros, w, offsets, quantiser=TensorwiseQuantiser())
    y.backward(grad_out)
    assert not y.any() and not w.grad.any() and torch.isfinite(zeros.grad).all()
