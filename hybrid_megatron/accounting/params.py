"""Parameter counts per block type and for the whole model, equal to the built model's.

Formulas (h = hidden_size, V = vocab_size, no biases anywhere except the Mamba conv1d):

- attention mixer (``A``): QKV h*(heads + 2*groups)*head_dim + output heads*head_dim*h.
- Mamba2 mixer (``M``): in-projection h*(2*d_inner + 2*G*N + H), conv1d weight and bias
  (d_inner + 2*G*N)*(k + 1), per-head A_log, D and dt_bias 3*H, gated RMSNorm weight d_inner,
  out-projection d_inner*h  (G groups, N state, H heads, k conv kernel).
- intra mixer (``H``): one in-projection h*(QKV rows + Mamba in-projection rows), the Mamba
  branch's conv1d, A_log, D, dt_bias and gated-norm weight, one RMSNorm weight per branch
  (``branch_norm: rmsnorm``: attention_width + mamba_width), one scalar per branch
  (``branch_scalars``), out-projection fused_width*h (concat: both widths; add/subtract: one).
- block norms: input RMSNorm h (blocks with a mixer), pre-FFN RMSNorm h (blocks with an FFN).
- single-sublayer layers: ``*`` the attention mixer, ``-`` a dense FFN, ``E`` an MoE FFN.
- dense FFN: m*h*ffn with m = 3 for flavour llama's SwiGLU (fc1 h -> 2*ffn, fc2 ffn -> h) and
  m = 2 for nemotron_h's relu2 (fc1 h -> ffn, fc2 ffn -> h).
- MoE FFN: router E*h + E * m*h*ffn_expert + shared expert m*h*ffn_shared (the expert
  score-correction bias is a buffer, not a parameter). Active: the router, top_k experts and
  the shared expert.
- embedding V*h, final RMSNorm h, output layer V*h unless ``tie_embeddings``.

Active parameters are the total minus the (E - top_k) routed experts a token does not use, in
every MoE layer; everything else (embeddings included) counts as active.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid_megatron.config.geometry import (
    AttentionDims,
    MambaDims,
    attention_dims,
    expert_ffn_size,
    ffn_matrices,
    fused_width,
    mamba_dims,
)
from hybrid_megatron.config.layer_pattern import (
    ATTENTION,
    ATTENTION_LETTERS,
    FFN_ONLY_LETTERS,
    INTRA,
    LETTER_ORDER,
    MAMBA,
    build_layer_pattern,
    ffn_is_moe,
    has_ffn,
    has_mixer,
)
from hybrid_megatron.config.model import ModelConfig


@dataclass
class BlockParams:
    """Parameters of one block of a given letter (per block, not times ``count``).

    ``mixer`` is the mixer sublayer (the paper's Table 1 counts only this), ``norms`` the
    block's input and pre-FFN RMSNorm weights, ``ffn``/``ffn_active`` the FFN sublayer (all
    experts / the experts one token uses).
    """

    letter: str
    count: int
    mixer: int
    norms: int
    ffn: int
    ffn_active: int

    @property
    def total(self) -> int:
        """All parameters of one such block."""
        return self.mixer + self.norms + self.ffn

    @property
    def active(self) -> int:
        """Parameters one token uses in one such block."""
        return self.mixer + self.norms + self.ffn_active


@dataclass
class ParamReport:
    """Parameter counts of a whole model.

    ``blocks`` maps each letter in ``pattern`` to its BlockParams; ``total`` equals
    ``sum(p.numel() for p in model.parameters())`` of the model built at TP=1, PP=1.
    """

    pattern: str
    blocks: dict[str, BlockParams]
    embedding: int
    output_layer: int
    final_norm: int
    total: int = field(init=False)
    active: int = field(init=False)

    def __post_init__(self) -> None:
        outer = self.embedding + self.output_layer + self.final_norm
        self.total = outer + sum(b.total * b.count for b in self.blocks.values())
        self.active = outer + sum(b.active * b.count for b in self.blocks.values())

    @property
    def non_embedding(self) -> int:
        """Total minus the embedding and output-layer matrices (the usual N of scaling laws)."""
        return self.total - self.embedding - self.output_layer

    def headline(self) -> dict[str, int]:
        """The counts logs and reports print: ``total``, ``active`` and ``non_embedding``."""
        return {"total": self.total, "active": self.active, "non_embedding": self.non_embedding}


def attention_mixer_params(h: int, a: AttentionDims) -> int:
    """Parameters of a Transformer block's attention mixer: fused QKV plus output projection.

    Takes the hidden size and the AttentionDims; returns h*qkv_width + width*h.
    """
    return h * a.qkv_width + a.width * h


def mamba_internal_params(m: MambaDims) -> int:
    """Parameters of a Mamba2 mixer other than its in/out projections.

    conv1d weight and bias (conv_dim*(k+1)), A_log, D and dt_bias (one per head each, D not
    per channel as megatron-core's default ``D_has_hdim=False``), gated RMSNorm weight (d_inner).
    """
    return m.conv_dim * (m.conv_kernel + 1) + 3 * m.heads + m.d_inner


def mamba_mixer_params(h: int, m: MambaDims) -> int:
    """Parameters of a Mamba block's mixer: in-projection, internals, out-projection."""
    return h * m.in_proj_width + mamba_internal_params(m) + m.d_inner * h


def intra_mixer_params(cfg: ModelConfig) -> int:
    """Parameters of the intra-layer hybrid mixer (see the module docstring)."""
    h = cfg.hidden_size
    a, m = attention_dims(cfg, INTRA), mamba_dims(cfg, INTRA)
    in_rows, total, branches = 0, 0, []
    if a is not None:
        in_rows += a.qkv_width
        branches.append(a.width)
    if m is not None:
        in_rows += m.in_proj_width
        total += mamba_internal_params(m)
        branches.append(m.d_inner)
    if cfg.intra.branch_norm == "rmsnorm":
        total += sum(branches)
    if cfg.intra.branch_scalars:
        total += len(branches)
    return total + h * in_rows + fused_width(cfg) * h


def mixer_params(cfg: ModelConfig, letter: str) -> int:
    """Parameters of one block's mixer sublayer, by block letter (0 for ``-`` and E)."""
    if letter in FFN_ONLY_LETTERS:
        return 0
    if letter in ATTENTION_LETTERS:
        a = attention_dims(cfg, ATTENTION)
        assert a is not None  # every attention letter has an attention mixer
        return attention_mixer_params(cfg.hidden_size, a)
    if letter == MAMBA:
        m = mamba_dims(cfg, MAMBA)
        assert m is not None
        return mamba_mixer_params(cfg.hidden_size, m)
    if letter == INTRA:
        return intra_mixer_params(cfg)
    raise ValueError(f"unknown block letter {letter!r} (expected A, M, H, *, - or E)")


def ffn_params(cfg: ModelConfig, moe: bool = True) -> tuple[int, int]:
    """(total, active) parameters of one FFN sublayer: dense or, when ``moe`` and the model has
    ``model.moe``, MoE (module docstring)."""
    h, mats = cfg.hidden_size, ffn_matrices(cfg)
    if cfg.moe is None or not moe:
        dense = mats * h * cfg.ffn_size
        return dense, dense
    moe_cfg = cfg.moe
    expert = mats * h * expert_ffn_size(cfg)
    shared = mats * h * moe_cfg.shared_expert_ffn_hidden_size if moe_cfg.shared_expert_ffn_hidden_size else 0
    router = moe_cfg.num_experts * h
    return router + moe_cfg.num_experts * expert + shared, router + moe_cfg.top_k * expert + shared


def block_params(cfg: ModelConfig, letter: str, count: int = 1) -> BlockParams:
    """BlockParams of one block of ``letter`` in the model ``cfg`` (``count`` is carried along)."""
    h = cfg.hidden_size
    with_ffn = has_ffn(cfg, letter)
    ffn, ffn_active = ffn_params(cfg, ffn_is_moe(cfg, letter)) if with_ffn else (0, 0)
    return BlockParams(
        letter=letter,
        count=count,
        mixer=mixer_params(cfg, letter),
        norms=h * (int(with_ffn) + int(has_mixer(letter))),
        ffn=ffn,
        ffn_active=ffn_active,
    )


def count_parameters(cfg: ModelConfig) -> ParamReport:
    """Count the parameters of the model ``cfg`` describes, per block type and in total.

    Takes a validated ModelConfig; returns a ParamReport whose ``total`` equals the parameter
    count of the model ``build_model`` builds at TP=1, PP=1, and whose ``active`` counts only
    the routed experts one token uses.
    """
    pattern = build_layer_pattern(cfg)
    blocks = {
        letter: block_params(cfg, letter, pattern.count(letter))
        for letter in sorted(set(pattern), key=LETTER_ORDER.index)
    }
    h, v = cfg.hidden_size, cfg.vocab_size
    return ParamReport(
        pattern=pattern,
        blocks=blocks,
        embedding=v * h,
        output_layer=0 if cfg.tie_embeddings else v * h,
        final_norm=h,
    )
