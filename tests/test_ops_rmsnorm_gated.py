"""Tests of the gated, grouped RMSNorm against its formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_megatron import ops
from tests.ops_helpers import F64, TOL, ref_gated_rmsnorm


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_rmsnorm_gated_formula(group_size, norm_before_gate, gated):
    gen = torch.Generator().manual_seed(12)
    hidden = 12
    x = torch.randn(3, 5, hidden, generator=gen, dtype=F64) * 3
    z = torch.randn(3, 5, hidden, generator=gen, dtype=F64) if gated else None
    norm = ops.RMSNormGated(
        hidden, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate, dtype=F64
    )
    assert norm.bias is None and torch.equal(norm.weight, torch.ones(hidden, dtype=F64))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=gen, dtype=F64))
    out = norm(x, z)

    gs = hidden if group_size is None else group_size
    gate = F.silu(z) if gated else torch.ones_like(x)
    pre = x * gate if not norm_before_gate else x
    groups = pre.reshape(3, 5, hidden // gs, gs)
    rms = torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)
    want = (groups / rms).reshape(3, 5, hidden) * norm.weight.detach()
    if norm_before_gate:
        want = want * gate
    assert (out - want).abs().max().item() < TOL
    out.sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_rmsnorm_gated_groups_differ_and_dtype():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4, 8, generator=gen)
    x[:, 4:] *= 10  # groups with different scales: grouped and global norms must disagree
    global_norm = ops.RMSNormGated(8, group_size=None)(x)
    grouped = ops.RMSNormGated(8, group_size=4)(x)
    assert (global_norm - grouped).abs().max().item() > 0.1
    xb = x.bfloat16()
    outb = ops.RMSNormGated(8, group_size=4, dtype=torch.bfloat16)(xb, xb)
    assert outb.dtype == torch.bfloat16
    want = ref_gated_rmsnorm(xb.double(), torch.ones(8, dtype=F64), xb.double(), 1e-5, 4, True)
    assert (outb.double() - want).abs().max().item() < 2e-2 * want.abs().max().item()
