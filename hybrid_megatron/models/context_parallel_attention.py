"""Causal attention over a context-parallel sequence by all-gathering keys and values.

megatron-core's local (non-TE) DotProductAttention has no context parallelism; on GPUs TE's
attention does it itself. This core-attention module is the local build's stand-in when
``context_parallel_size > 1``, so CP runs (and is tested) on CPU with gloo: every rank gathers
the keys and values of the whole sequence from its CP group, then attends with its own queries.

Each rank holds two of the sequence's 2 x CP equal chunks (rank r: chunks r and 2CP-1-r, the
load-balanced order of megatron-core's ``get_batch_on_this_cp_rank``), so the causal mask and
the sliding window are built from the global positions of queries and keys, not their local
indices. The all-gather's backward reduce-scatters the key/value gradients back to their owners.
"""

from __future__ import annotations

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention


def context_parallel_positions(local_length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global sequence positions of the ``local_length`` positions a CP rank holds.

    The rank holds chunks ``cp_rank`` and ``2*cp_size-1-cp_rank`` of ``2*cp_size`` equal chunks,
    in that order; returns a 1-D int64 tensor (on the CPU) of length ``local_length``.
    """
    chunk = local_length // 2
    first = cp_rank * chunk
    second = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


class AllGatherKVAttention(MegatronModule):
    """Core attention (softmax(QK^T)V) of one layer for a sequence split over a CP group.

    Takes the constructor arguments megatron-core's SelfAttention gives any core attention;
    ``pg_collection`` must hold the ``tp`` and ``cp`` groups. Causal only (with the config's
    sliding window where the layer has one), GQA, no packed sequences, no explicit mask.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"AllGatherKVAttention is causal only, got {attn_mask_type}")
        if config.softmax_type != "vanilla":
            raise ValueError(f"AllGatherKVAttention: softmax_type {config.softmax_type!r} is not supported")
        self.cp_group = pg_collection.cp
        tp = pg_collection.tp.size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.width = config.kv_channels * self.heads
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window_left = config.window_size[0] if windowed else None
        self.dropout = torch.nn.Dropout(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """Attend this rank's queries [sq, b, heads, d] to the gathered keys/values
        [sk, b, groups, d] of every CP rank; returns the context [sq, b, heads*d]."""
        if packed_seq_params is not None or attention_bias is not None or attention_mask is not None:
            raise ValueError(
                "context parallelism on the local build takes no packed sequences, attention "
                "bias or explicit attention mask (the mask is causal from global positions)"
            )
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        sq = query.shape[0]
        keys = gather_from_sequence_parallel_region(key, True, self.cp_group)
        values = gather_from_sequence_parallel_region(value, True, self.cp_group)
        q_pos = context_parallel_positions(sq, cp_size, cp_rank).to(query.device)
        k_pos = torch.cat([context_parallel_positions(key.shape[0], cp_size, r) for r in range(cp_size)])
        distance = q_pos[:, None] - k_pos.to(query.device)[None, :]
        hidden = distance < 0
        if self.window_left is not None:
            hidden |= distance > self.window_left
        repeat = self.heads // self.groups
        # [s, b, n, d] -> [b, n, s, d]; GQA: each key/value group serves `repeat` query heads.
        q = query.permute(1, 2, 0, 3)
        k = keys.repeat_interleave(repeat, dim=2).permute(1, 2, 0, 3)
        v = values.repeat_interleave(repeat, dim=2).permute(1, 2, 0, 3)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1).to(v.dtype)
        if self.config.sequence_parallel:
            probs = self.dropout(probs)
        else:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.dropout(probs)
        context = torch.matmul(probs, v)  # [b, n, sq, d]
        return context.permute(2, 0, 1, 3).reshape(sq, query.shape[1], self.width)
