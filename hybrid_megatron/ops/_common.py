"""Helpers shared by the ops: compute precision, dt's softplus, activations, decode-cache rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any floating input is float64, else float32 (the kernels' accumulation type)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def softplus(x: Tensor) -> Tensor:
    """softplus with the kernels' switch to the identity above 20, so values and gradients agree."""
    return F.softplus(x, beta=1.0, threshold=20.0)


def check_activation(activation: str | None) -> None:
    """Raise NotImplementedError unless ``activation`` is one the kernels support."""
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")


def activate(x: Tensor, activation: str | None) -> Tensor:
    """SiLU for "silu"/"swish", identity for None."""
    if activation in ("silu", "swish"):
        return F.silu(x)
    return x


def read_cache_rows(
    cache: Tensor, indices: Tensor | None, batch: int, names: tuple[str, str]
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The decode-cache rows of a batch, as mamba-ssm's update kernels address them.

    Takes the cache (rows first), the optional per-sample row ``indices`` (a negative index marks
    a padded sample, which reads row 0 and is masked later), the batch size and the names of the
    cache and indices arguments, for errors. Returns (rows, long indices or None, valid mask or
    None).
    """
    if indices is None:
        if cache.shape[0] != batch:
            raise ValueError(f"{names[0]} batch must equal x's batch without {names[1]}")
        return cache, None, None
    idx = indices.to(device=cache.device, dtype=torch.long)
    valid = idx >= 0
    return cache[idx.clamp(min=0)], idx, valid


def write_cache_rows(cache: Tensor, new_rows: Tensor, idx: Tensor | None, valid: Tensor | None) -> None:
    """Store ``new_rows`` into ``cache`` in place at the rows ``read_cache_rows`` read; padded
    samples leave the cache untouched. Returns nothing."""
    # Cached states are inference buffers: never let them join an autograd graph.
    with torch.no_grad():
        new_rows = new_rows.detach()
        if idx is None or valid is None:  # both or neither (read_cache_rows)
            cache.copy_(new_rows)
        else:
            cache[idx[valid]] = new_rows[valid]


def zero_padded_rows(out: Tensor, valid: Tensor | None) -> Tensor:
    """``out`` (batch first) with padded samples' rows zeroed, as the kernels leave them."""
    if valid is None:
        return out
    return out * valid.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))
