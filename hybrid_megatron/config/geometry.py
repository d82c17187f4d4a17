"""The shapes of each block's mixers, read once from a ModelConfig (no megatron-core).

Each block letter (``A`` attention, ``M`` Mamba2, ``H`` intra-layer hybrid) has at most one
attention mixer and at most one Mamba2 mixer; this module says how wide each one is. Parameters,
FLOPs and cache bytes (``hybrid_megatron.accounting``), the parallel-layout check, the builders
and the exporters all read these widths here, so they agree on the model they describe:

- ``A``: ``attention.num_heads`` query heads of ``head_dim``, ``query_groups`` KV heads, window
  ``attention.sliding_window`` (None = full causal attention).
- ``M``: d_inner = ``mamba.expand * hidden_size``; d_inner / ``mamba.head_dim`` SSM heads.
- ``H``: ``intra_branch_widths`` splits the mixer width; the attention branch has
  attention_width / head_dim heads and ``intra.num_query_groups`` (default: as many as heads) KV
  heads, the same window as ``A``; the Mamba branch has mamba_width / ``mamba.head_dim`` heads.
- ``*`` (attention only) has ``A``'s attention; ``-`` (MLP only) and ``E`` (MoE only) no mixer.

FFNs: ``A``, ``H``, ``-``, ``E`` carry one, ``M`` when ``mamba_block_ffn``; it is an MoE for
``E`` and, when ``model.moe`` is set, for ``A``/``M``/``H``; ``-`` is always dense. Flavour llama's
FFNs and experts are gated (SwiGLU: three h x ffn matrices), nemotron_h's are not (relu2: two).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_megatron.config.layer_pattern import (
    ATTENTION_LETTERS,
    FFN_ONLY_LETTERS,
    INTRA,
    MAMBA,
)
from hybrid_megatron.config.model import ModelConfig, parse_ratio


def intra_branch_widths(cfg: ModelConfig) -> tuple[int, int]:
    """Attention and Mamba channel widths of the intra block: mixer_width split by dim_ratio.

    Takes the ModelConfig; returns (attention_width, mamba_width), each a multiple of its
    branch's head size (attention.head_dim, mamba.head_dim). Raises ValueError naming the field.
    """
    total = cfg.intra.mixer_width or cfg.mamba.expand * cfg.hidden_size
    a, m = parse_ratio(cfg.intra.dim_ratio, "model.intra.dim_ratio")
    attention_width = total * a // (a + m)
    mamba_width = total - attention_width
    if attention_width % cfg.head_dim or mamba_width % cfg.mamba.head_dim:
        raise ValueError(
            f"model.intra.dim_ratio: widths {attention_width} (attention) and {mamba_width} "
            f"(mamba) of mixer_width {total} must be multiples of attention.head_dim "
            f"{cfg.head_dim} and mamba.head_dim {cfg.mamba.head_dim}"
        )
    return attention_width, mamba_width


@dataclass(frozen=True)
class AttentionDims:
    """One self-attention mixer: query heads, KV groups, head size, window (None = full)."""

    heads: int
    groups: int
    head_dim: int
    window: int | None

    @property
    def width(self) -> int:
        """Channels of the attention output (heads * head_dim)."""
        return self.heads * self.head_dim

    @property
    def qkv_width(self) -> int:
        """Output rows of the fused QKV projection: (heads + 2 * groups) * head_dim."""
        return (self.heads + 2 * self.groups) * self.head_dim


@dataclass(frozen=True)
class MambaDims:
    """One Mamba2 mixer: inner width, SSM heads, head size P, B/C groups, state N, conv, chunk."""

    d_inner: int
    heads: int
    head_dim: int
    groups: int
    state: int
    conv_kernel: int
    chunk: int

    @property
    def conv_dim(self) -> int:
        """Channels through the depthwise conv1d: x, B and C (d_inner + 2 * groups * state)."""
        return self.d_inner + 2 * self.groups * self.state

    @property
    def in_proj_width(self) -> int:
        """Output rows of the in-projection: z, x, B, C, dt = 2*d_inner + 2*groups*state + heads."""
        return 2 * self.d_inner + 2 * self.groups * self.state + self.heads


def attention_dims(cfg: ModelConfig, letter: str) -> AttentionDims | None:
    """The attention mixer of a block, or None if the block has none.

    Takes the ModelConfig and the block letter (A, M or H); returns AttentionDims. Raises
    ValueError for an unknown letter or widths that do not divide into heads.
    """
    if letter == MAMBA or letter in FFN_ONLY_LETTERS:
        return None
    window = cfg.attention.sliding_window
    if letter in ATTENTION_LETTERS:
        return AttentionDims(cfg.attention.num_heads, cfg.query_groups, cfg.head_dim, window)
    if letter == INTRA:
        width, _ = intra_branch_widths(cfg)
        if width == 0:
            return None
        heads = width // cfg.head_dim
        return AttentionDims(heads, cfg.intra.num_query_groups or heads, cfg.head_dim, window)
    raise ValueError(f"unknown block letter {letter!r} (expected A, M, H, *, - or E)")


def mamba_dims(cfg: ModelConfig, letter: str) -> MambaDims | None:
    """The Mamba2 mixer of a block, or None if the block has none.

    Takes the ModelConfig and the block letter (A, M or H); returns MambaDims.
    """
    if letter in ATTENTION_LETTERS or letter in FFN_ONLY_LETTERS:
        return None
    if letter == MAMBA:
        d_inner = cfg.mamba.expand * cfg.hidden_size
    elif letter == INTRA:
        _, d_inner = intra_branch_widths(cfg)
        if d_inner == 0:
            return None
    else:
        raise ValueError(f"unknown block letter {letter!r} (expected A, M, H, *, - or E)")
    m = cfg.mamba
    return MambaDims(
        d_inner=d_inner,
        heads=d_inner // m.head_dim,
        head_dim=m.head_dim,
        groups=m.num_groups,
        state=m.state_dim,
        conv_kernel=m.conv_kernel,
        chunk=m.chunk_size,
    )


def fused_width(cfg: ModelConfig) -> int:
    """Input width of the intra block's out-projection: the sum of the branch widths for
    ``concat`` fusion, one branch's width for ``add``/``subtract`` (equal widths, or only one
    branch present)."""
    attention_width, mamba_width = intra_branch_widths(cfg)
    if cfg.intra.fusion == "concat":
        return attention_width + mamba_width
    return max(attention_width, mamba_width)


def ffn_matrices(cfg: ModelConfig) -> int:
    """h x ffn matrices per dense FFN or expert: 3 gated (SwiGLU, llama), 2 not (relu2)."""
    return 3 if cfg.gated_ffn else 2


def expert_ffn_size(cfg: ModelConfig) -> int:
    """Inner size of one routed expert (``moe.expert_ffn_hidden_size``, default the dense FFN)."""
    return cfg.moe.expert_ffn_hidden_size or cfg.ffn_size
