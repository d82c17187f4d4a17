"""Gated, grouped RMSNorm: mamba-ssm's ``layernorm_gated`` (``rmsnorm_fn``, ``RMSNorm``) in torch.

The Mamba2 mixer normalises the SSD output gated by z; this is the stand-in for mamba-ssm's Triton
norm where it is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid_megatron.ops._common import compute_dtype

__all__ = ["rmsnorm_fn", "RMSNormGated"]


def rmsnorm_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    z: Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> Tensor:
    """Grouped RMSNorm with an optional SiLU gate, as mamba-ssm's ``layernorm_gated.rmsnorm_fn``.

    With ``norm_before_gate``: ``rmsnorm(x) * w (+ b) * silu(z)``; otherwise
    ``rmsnorm(x * silu(z)) * w (+ b)``. The RMS is taken over consecutive groups of
    ``group_size`` channels (None means one group of all channels).

    Args:
        x: (..., hidden).
        weight: (hidden,); bias: (hidden,) or None.
        z: like x, or None (then no gate).
        eps: added to the mean square.
        group_size: channels per normalisation group; must divide hidden.
        norm_before_gate: where the gate goes, see above.

    Returns:
        Tensor with x's shape and dtype (computed in float32, or float64 for float64 x).
    """
    hidden = x.shape[-1]
    gs = hidden if group_size is None else int(group_size)
    if hidden % gs != 0:
        raise ValueError(f"group_size {gs} must divide the hidden size {hidden}")
    if z is not None and z.shape != x.shape:
        raise ValueError("z must have x's shape")
    cdt = compute_dtype(x, weight, bias, z)
    xf = x.to(cdt)
    gate = F.silu(z.to(cdt)) if z is not None else None
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    xg = xf.unflatten(-1, (hidden // gs, gs))
    rstd = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    out = (xg * rstd).flatten(-2) * weight.to(cdt)
    if bias is not None:
        out = out + bias.to(cdt)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)


class RMSNormGated(torch.nn.Module):
    """Gated, grouped RMSNorm module; same constructor, parameters and forward as mamba-ssm's
    ``mamba_ssm.ops.triton.layernorm_gated.RMSNorm`` (megatron imports it as ``RMSNormGated``).

    Parameters: ``weight`` (hidden_size,) initialised to ones; ``bias`` is registered as None.
    """

    bias: Tensor | None  # registered as None: the checker would read it as a submodule

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = True,
        device=None,
        dtype=None,
    ):
        """hidden_size: channels; eps: added to the mean square; group_size: channels per group
        (None = one group); norm_before_gate: norm(x) * silu(z) if True, else norm(x * silu(z))."""
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, **factory_kwargs))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the weight to ones."""
        torch.nn.init.ones_(self.weight)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """x: (..., hidden_size); z: same shape or None. Returns x's shape and dtype."""
        return rmsnorm_fn(
            x,
            self.weight,
            self.bias,
            z=z,
            eps=self.eps,
            group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )
