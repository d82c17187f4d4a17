"""megatron-core's fused, grouped QKV projection <-> separate q/k/v projections (HF layouts)."""

from __future__ import annotations

import torch


def split_qkv(w: torch.Tensor, heads: int, groups: int, head_dim: int):
    """megatron's grouped QKV rows -> (q, k, v) rows in plain head order.

    Takes the fused weight [(heads + 2*groups) * head_dim, hidden] (rows per KV group: its
    heads/groups query heads, then its key, then its value head) and the head counts; returns
    (q [heads*head_dim, hidden], k [groups*head_dim, hidden], v [groups*head_dim, hidden]).
    """
    per = heads // groups
    w = w.reshape(groups, per + 2, head_dim, -1)
    q = w[:, :per].reshape(heads * head_dim, -1)
    k = w[:, per].reshape(groups * head_dim, -1)
    v = w[:, per + 1].reshape(groups * head_dim, -1)
    return q, k, v


def join_qkv(q, k, v, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Inverse of split_qkv: (q, k, v) rows -> megatron's grouped fused QKV weight."""
    per = heads // groups
    hidden = q.shape[-1]
    return torch.cat(
        [
            q.reshape(groups, per, head_dim, hidden),
            k.reshape(groups, 1, head_dim, hidden),
            v.reshape(groups, 1, head_dim, hidden),
        ],
        dim=1,
    ).reshape(-1, hidden)
