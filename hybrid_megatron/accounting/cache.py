"""Inference cache bytes per sequence at context length L, per block type and in total.

For one sequence (batch 1) with elements of ``dtype_bytes`` bytes:

- attention (``A`` and ``*`` blocks and the ``H`` block's attention branch): keys and values,
  2 * groups * head_dim * min(L, W) * dtype_bytes (W the sliding window: a windowed layer keeps
  only its last W positions);
- Mamba2 (``M`` blocks and the ``H`` block's Mamba branch), independent of L: the conv state,
  (d_inner + 2*G*N) * k * dtype_bytes (megatron-core keeps the last k inputs of the conv,
  ``mamba_state_shapes_per_request``), and the SSM state, H * P * N * dtype_bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid_megatron.config.geometry import attention_dims, mamba_dims
from hybrid_megatron.config.layer_pattern import LETTER_ORDER, build_layer_pattern
from hybrid_megatron.config.model import ModelConfig


@dataclass
class BlockCache:
    """Cache bytes of one block of a given letter (per block, not times ``count``)."""

    letter: str
    count: int
    kv_bytes: int
    conv_bytes: int
    ssm_bytes: int

    @property
    def total(self) -> int:
        """All cache bytes of one such block."""
        return self.kv_bytes + self.conv_bytes + self.ssm_bytes


@dataclass
class CacheReport:
    """Inference cache of a whole model for one sequence of ``seq_len`` tokens."""

    pattern: str
    seq_len: int
    dtype_bytes: int
    blocks: dict[str, BlockCache]
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.total_bytes = sum(b.total * b.count for b in self.blocks.values())


def block_cache(
    cfg: ModelConfig, letter: str, seq_len: int, dtype_bytes: int = 2, count: int = 1
) -> BlockCache:
    """BlockCache of one block of ``letter`` at context ``seq_len`` (formulas: module docstring)."""
    a, m = attention_dims(cfg, letter), mamba_dims(cfg, letter)
    kv = conv = ssm = 0
    if a is not None:
        kept = seq_len if a.window is None else min(seq_len, a.window)
        kv = 2 * a.groups * a.head_dim * kept * dtype_bytes
    if m is not None:
        conv = m.conv_dim * m.conv_kernel * dtype_bytes
        ssm = m.heads * m.head_dim * m.state * dtype_bytes
    return BlockCache(letter, count, kv, conv, ssm)


def cache_bytes(cfg: ModelConfig, seq_len: int, dtype_bytes: int = 2) -> CacheReport:
    """Inference cache of the model ``cfg`` for one sequence of ``seq_len`` tokens.

    Takes a validated ModelConfig, the context length and the bytes per cached element (2 for
    bf16/fp16, 4 for fp32); returns a CacheReport with per-block-type KV, conv and SSM bytes and
    the total. Raises ValueError for non-positive arguments.
    """
    if seq_len <= 0 or dtype_bytes <= 0:
        raise ValueError(f"seq_len and dtype_bytes must be positive, got {seq_len}, {dtype_bytes}")
    pattern = build_layer_pattern(cfg)
    blocks = {
        letter: block_cache(cfg, letter, seq_len, dtype_bytes, pattern.count(letter))
        for letter in sorted(set(pattern), key=LETTER_ORDER.index)
    }
    return CacheReport(pattern, seq_len, dtype_bytes, blocks)
