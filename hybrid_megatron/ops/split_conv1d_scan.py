"""The whole Mamba2 mixer core from the in-projection output, mamba-ssm's fused training path.

``mamba_split_conv1d_scan_combined`` composed from the other ops (conv, chunked SSD, gated norm),
so megatron-core's MambaMixer trains where mamba-ssm's fused kernel is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid_megatron.ops._common import check_activation, compute_dtype
from hybrid_megatron.ops.causal_conv1d import causal_conv1d_fn
from hybrid_megatron.ops.rmsnorm_gated import rmsnorm_fn
from hybrid_megatron.ops.ssd_chunked import NO_DT_LIMIT, process_dt, ssd_chunked

__all__ = ["mamba_split_conv1d_scan_combined"]


def mamba_split_conv1d_scan_combined(
    zxbcdt: Tensor,
    conv1d_weight: Tensor,
    conv1d_bias: Tensor | None,
    dt_bias: Tensor,
    A: Tensor,
    D: Tensor,
    chunk_size: int,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    return_final_states: bool = False,
    activation: str | None = "silu",
    rmsnorm_weight: Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: Tensor | None = None,
    outproj_bias: Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
):
    """Whole Mamba2 mixer core from the in-projection output; mamba-ssm's fused training path.

    The last dim of ``zxbcdt`` is laid out ``[zx0 | z | x B C | dt]`` with widths
    ``[2*d_nonssm, dim, dim + 2*ngroups*dstate, nheads]`` (``d_nonssm`` is normally 0; when
    positive, ``silu(zx0[:d_nonssm]) * zx0[d_nonssm:]`` is prepended to the output). ``xBC`` goes
    through the causal depthwise conv + activation, is split into x (nheads, headdim), B and C
    (ngroups, dstate), and runs through the SSD with ``dt_softplus=True``. Then:

    * ``rmsnorm_weight is None``: the SSD gates its own output, ``y * silu(z)``;
    * otherwise the SSD runs ungated and z gates a grouped RMSNorm (group size
      ``dim // ngroups``) before or after the norm according to ``norm_before_gate``;
    * ``outproj_weight`` given: a final ``F.linear(out, outproj_weight, outproj_bias)``.

    Args:
        zxbcdt: (batch, seqlen, 2*d_nonssm + 2*dim + 2*ngroups*dstate + nheads).
        conv1d_weight: (dim + 2*ngroups*dstate, width); dstate is inferred from it.
        conv1d_bias: (dim + 2*ngroups*dstate,) or None.
        dt_bias: (nheads,).
        A: (nheads,).
        D: (nheads, headdim) or (nheads,); nheads (and headdim if 2-D) are read from it.
        chunk_size: SSD chunk length.
        initial_states: (batch, nheads, headdim, dstate) SSM state, or None.
        seq_idx: (batch, seqlen) int ids of packed sequences (conv and SSD both respect them).
        dt_limit: (min, max) clamp of softplus(dt + dt_bias).
        return_final_states: also return the final SSM state.
        activation: conv activation, None / "silu" / "swish".
        rmsnorm_weight: (dim,) or None; rmsnorm_eps: its epsilon.
        outproj_weight: (out_dim, d_nonssm + dim) or None; outproj_bias: (out_dim,) or None.
        headdim: required when D is 1-D.
        ngroups: number of B/C groups.
        norm_before_gate: see above.

    Returns:
        out (batch, seqlen, d_nonssm + dim) (or out_dim after the projection) in zxbcdt's dtype
        (the projection follows autocast when enabled); with ``return_final_states`` the tuple
        (out, final_states), final_states (batch, nheads, headdim, dstate) in float32.
    """
    check_activation(activation)
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim must be given when D is 1-D")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    batch, seqlen, width_in = zxbcdt.shape
    dim = nheads * headdim
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be divisible by ngroups ({ngroups})")
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (width_in - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    if d_nonssm < 0 or width_in != 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads:
        raise ValueError(
            f"zxbcdt last dim {width_in} does not fit dim={dim}, ngroups={ngroups}, "
            f"dstate={dstate}, nheads={nheads}"
        )
    if tuple(dt_bias.shape) != (nheads,) or tuple(A.shape) != (nheads,):
        raise ValueError(f"dt_bias and A must be ({nheads},)")
    if rmsnorm_weight is not None and tuple(rmsnorm_weight.shape) != (dim,):
        raise ValueError(f"rmsnorm_weight must be ({dim},), got {tuple(rmsnorm_weight.shape)}")
    if outproj_weight is None and outproj_bias is not None:
        raise ValueError("outproj_bias needs outproj_weight")

    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    cdt = compute_dtype(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, initial_states)

    # Conv in compute precision (the kernel would round its output to zxbcdt's dtype here).
    xBC_conv = causal_conv1d_fn(
        xBC.transpose(1, 2).to(cdt),
        conv1d_weight,
        conv1d_bias,
        seq_idx=seq_idx,
        activation=activation,
    ).transpose(1, 2)
    x, B, C = torch.split(xBC_conv, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.reshape(batch, seqlen, nheads, headdim)
    B = B.reshape(batch, seqlen, ngroups, dstate)
    C = C.reshape(batch, seqlen, ngroups, dstate)
    z = z.reshape(batch, seqlen, nheads, headdim)

    dt_proc = process_dt(dt, dt_bias, True, dt_limit, cdt)
    y, final_states, _ = ssd_chunked(
        x,
        dt_proc,
        A,
        B,
        C,
        chunk_size,
        D,
        z if rmsnorm_weight is None else None,
        initial_states,
        seq_idx,
        None,
        cdt,
    )
    y = y.reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        y = rmsnorm_fn(
            y,
            rmsnorm_weight,
            None,
            z=z.reshape(batch, seqlen, dim),
            eps=rmsnorm_eps,
            group_size=dim // ngroups,
            norm_before_gate=norm_before_gate,
        )
    out = y.to(zxbcdt.dtype)
    if d_nonssm > 0:
        gate_in, up = zx0.chunk(2, dim=-1)
        out = torch.cat([(F.silu(gate_in.to(cdt)) * up.to(cdt)).to(zxbcdt.dtype), out], dim=-1)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return (out, final_states) if return_final_states else out
