"""Checkpoint sharding helpers for fused, tensor-parallel weights.

A fused projection holds, on every TP rank, its local slices of several logical tensors
side by side. Saving it as one ShardedTensor would tie the checkpoint to the TP size; instead
each logical part becomes its own ShardedTensor (key ``<key>.<part>``), so megatron-core's
dist_checkpointing can reload it at any TP size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def split_sharded_tensor(
    sharded: ShardedTensor, sections: Sequence[int], names: Sequence[str], dim: int
) -> ShardedTensorFactory:
    """Wrap a TP-sharded fused tensor so each named section is checkpointed on its own.

    Takes the fused tensor's ShardedTensor, the local section sizes along ``dim`` (summing to the
    local size), and one name per section; returns a ShardedTensorFactory whose build step
    narrows the tensor into ``<key>.<name>`` ShardedTensors and whose merge step concatenates
    the loaded sections back in order.
    """
    if len(sections) != len(names):
        raise ValueError(f"{len(sections)} sections but {len(names)} names")
    if sum(sections) != sharded.local_shape[dim]:
        raise ValueError(
            f"sections {list(sections)} do not cover local size {sharded.local_shape[dim]} "
            f"of {sharded.key} along dim {dim}"
        )
    template = sharded.without_data()

    @torch.no_grad()
    def build(key, data, replica_id, flattened_range):
        whole = replace(
            template,
            key=key,
            data=data,
            dtype=data.dtype,
            replica_id=replica_id,
            flattened_range=flattened_range,
        )
        parts, start = [], 0
        for size, name in zip(sections, names):
            if size:
                for piece in whole.narrow(dim, start, size):
                    piece.key = f"{piece.key}.{name}"
                    parts.append(piece)
            start += size
        return parts

    @torch.no_grad()
    def merge(loaded):
        return torch.cat(loaded, dim=dim)

    return ShardedTensorFactory(sharded.key, sharded.data, build, merge, sharded.replica_id)
