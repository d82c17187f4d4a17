"""Training FLOPs per token and per sample, per block type and for the whole model.

Conventions:

- A multiply-accumulate is 2 FLOPs. Only matrix-multiply (and convolution) work is counted;
  norms, activations, softmax, the SSD decay masks and the state recurrence between chunks,
  residual adds and the intra block's fusion are elementwise and left out.
- Training = forward + backward = 3 x forward (the backward pass does two matmuls per forward
  matmul: input gradient and weight gradient).
- A sample is one sequence of ``seq_len`` tokens; per token = per sample / seq_len. Per-sample
  figures are exact integers.

Forward FLOPs per sample of length L (h = hidden size):

- linear layer of n_in -> n_out: 2 * n_in * n_out * L.
- attention core (heads H_a, head size d): QK^T and AV each cost 2 * H_a * d per (query, key)
  pair the query attends to. Causal masking: query i (1-based) sees min(i, W) keys, W the sliding
  window (W = L without one), so both terms are 2 * H_a * d * S with
  S = sum_{i=1..L} min(i, W)  -- L(L+1)/2 for full causal attention ("causal halving": about
  half of the L^2 a full score matrix would cost; flash-attention kernels skip the masked
  blocks), about L*W once L >> W.
- Mamba2 SSD, chunked algorithm (chunk Q, SSM heads H, head size P, state N, groups G):
    * intra-chunk (quadratic in Q): C B^T per group, 2 * G * N * S_Q, and the masked
      (C B^T o decay) X per head, 2 * H * P * S_Q, where S_Q = sum over tokens of their causal
      context inside their chunk = (L // Q) * Q(Q+1)/2 + r(r+1)/2, r = L mod Q;
    * state work (linear in L): chunk states B^T X, 2 * H * P * N * L, and the inter-chunk output
      C . state, 2 * H * P * N * L.
- Mamba2 depthwise conv1d over x, B, C (kernel k): 2 * (d_inner + 2*G*N) * k * L.
- Mamba2 projections: in 2 * h * (2*d_inner + 2*G*N + H) * L, out 2 * d_inner * h * L.
- intra block: one in-projection over both branches' rows, the attention core and the SSD/conv
  terms of its branches, one out-projection 2 * fused_width * h * L.
- dense FFN: 2 * m * h * ffn * L, m = 3 matrices for SwiGLU (flavour llama), 2 for relu2
  (nemotron_h). MoE: router 2 * h * E * L, top_k routed experts 2 * m * h * ffn_expert * top_k
  * L, shared expert 2 * m * h * ffn_shared * L.
- single-sublayer layers: ``*`` the attention terms only, ``-`` a dense FFN, ``E`` an MoE.
- LM head: 2 * h * V * L (the input embedding is a lookup, 0 FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    ATTENTION_LETTERS,
    FFN_ONLY_LETTERS,
    INTRA,
    LETTER_ORDER,
    MAMBA,
    build_layer_pattern,
    ffn_is_moe,
    has_ffn,
)
from hybrid_megatron.config.model import ModelConfig

TRAINING_MULTIPLIER = 3  # forward + backward (2x forward)


def causal_context_sum(seq_len: int, window: int | None = None) -> int:
    """S = sum over query positions i = 1..L of min(i, W): the (query, key) pairs a causal,
    optionally windowed attention computes. Returns L(L+1)/2 without a window."""
    w = seq_len if window is None else min(window, seq_len)
    # positions 1..w see i keys; positions w+1..L see w keys each.
    return w * (w + 1) // 2 + (seq_len - w) * w


def chunk_context_sum(seq_len: int, chunk: int) -> int:
    """S_Q = sum over tokens of their causal context inside their SSD chunk of length ``chunk``
    (a last, shorter chunk counts its own length)."""
    full, rest = divmod(seq_len, chunk)
    return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


def attention_core_terms(a: AttentionDims, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per sample of the attention core: ``attn_scores`` (QK^T), ``attn_values``
    (AV), each 2 * heads * head_dim * causal_context_sum(L, window)."""
    pairs = causal_context_sum(seq_len, a.window)
    per_pair = 2 * a.heads * a.head_dim
    return {"attn_scores": per_pair * pairs, "attn_values": per_pair * pairs}


def ssd_terms(m: MambaDims, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per sample of a Mamba2 mixer between its projections: ``conv1d``,
    ``ssd_intra_chunk`` (the chunk-quadratic C B^T and masked-matrix times X) and ``ssd_state``
    (chunk states and the state-to-output product). Formulas in the module docstring."""
    s_q = chunk_context_sum(seq_len, m.chunk)
    return {
        "conv1d": 2 * m.conv_dim * m.conv_kernel * seq_len,
        "ssd_intra_chunk": 2 * m.groups * m.state * s_q + 2 * m.heads * m.head_dim * s_q,
        "ssd_state": 2 * 2 * m.heads * m.head_dim * m.state * seq_len,
    }


def mixer_terms(cfg: ModelConfig, letter: str, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per sample of one block's mixer, by term (name -> FLOPs)."""
    h, L = cfg.hidden_size, seq_len
    a, m = attention_dims(cfg, letter), mamba_dims(cfg, letter)
    terms: dict[str, int] = {}
    if letter in FFN_ONLY_LETTERS:
        return terms
    if letter in ATTENTION_LETTERS:
        assert a is not None  # every attention letter has an attention mixer
        terms["qkv_proj"] = 2 * h * a.qkv_width * L
        terms.update(attention_core_terms(a, L))
        terms["out_proj"] = 2 * a.width * h * L
    elif letter == MAMBA:
        assert m is not None
        terms["in_proj"] = 2 * h * m.in_proj_width * L
        terms.update(ssd_terms(m, L))
        terms["out_proj"] = 2 * m.d_inner * h * L
    elif letter == INTRA:
        rows = (a.qkv_width if a else 0) + (m.in_proj_width if m else 0)
        terms["in_proj"] = 2 * h * rows * L
        if a is not None:
            terms.update(attention_core_terms(a, L))
        if m is not None:
            terms.update(ssd_terms(m, L))
        terms["out_proj"] = 2 * fused_width(cfg) * h * L
    else:
        raise ValueError(f"unknown block letter {letter!r} (expected A, M, H, *, - or E)")
    return terms


def ffn_terms(cfg: ModelConfig, seq_len: int, moe: bool = True) -> dict[str, int]:
    """Forward FLOPs per sample of one FFN sublayer: ``ffn`` (dense: no ``model.moe`` or not
    ``moe``) or ``moe_router``, ``moe_experts`` (top_k active experts) and ``moe_shared``."""
    h, L, mats = cfg.hidden_size, seq_len, ffn_matrices(cfg)
    if cfg.moe is None or not moe:
        return {"ffn": 2 * mats * h * cfg.ffn_size * L}
    moe_cfg = cfg.moe
    terms = {
        "moe_router": 2 * h * moe_cfg.num_experts * L,
        "moe_experts": 2 * mats * h * expert_ffn_size(cfg) * moe_cfg.top_k * L,
    }
    if moe_cfg.shared_expert_ffn_hidden_size:
        terms["moe_shared"] = 2 * mats * h * moe_cfg.shared_expert_ffn_hidden_size * L
    return terms


class _TrainingFromForward:
    """Training FLOPs derived from ``forward_per_sample`` and ``seq_len`` (backward = 2 x
    forward), shared by a block's and the whole model's report."""

    if TYPE_CHECKING:  # provided by each report (a property or a dataclass field)

        @property
        def forward_per_sample(self) -> int: ...

        @property
        def seq_len(self) -> int: ...

    @property
    def training_per_sample(self) -> int:
        """Forward + backward FLOPs over one sample (3 x forward)."""
        return TRAINING_MULTIPLIER * self.forward_per_sample

    @property
    def training_per_token(self) -> float:
        """Forward + backward FLOPs per token (averaged over the sample)."""
        return self.training_per_sample / self.seq_len


@dataclass
class BlockFlops(_TrainingFromForward):
    """FLOPs of one block of a given letter (per block, not times ``count``).

    ``terms`` maps each term name to its forward FLOPs per sample; ``mixer_forward`` sums the
    mixer's terms (the paper's Table 1 per-block cost counts the mixer).
    """

    letter: str
    count: int
    seq_len: int
    terms: dict[str, int]
    mixer_forward: int

    @property
    def forward_per_sample(self) -> int:
        """Forward FLOPs of one such block over one sample."""
        return sum(self.terms.values())


@dataclass
class FlopReport(_TrainingFromForward):
    """Training FLOPs of a whole model at one sequence length.

    ``blocks`` maps each letter of ``pattern`` to its BlockFlops; ``lm_head_forward`` is the
    output layer's forward FLOPs per sample.
    """

    pattern: str
    seq_len: int
    blocks: dict[str, BlockFlops]
    lm_head_forward: int
    forward_per_sample: int = field(init=False)

    def __post_init__(self) -> None:
        self.forward_per_sample = self.lm_head_forward + sum(
            b.forward_per_sample * b.count for b in self.blocks.values()
        )

    @property
    def forward_per_token(self) -> float:
        """Forward FLOPs of the model per token."""
        return self.forward_per_sample / self.seq_len


def block_flops(cfg: ModelConfig, letter: str, seq_len: int, count: int = 1) -> BlockFlops:
    """BlockFlops of one block of ``letter`` at ``seq_len`` (``count`` is carried along)."""
    mixer = mixer_terms(cfg, letter, seq_len)
    terms = dict(mixer)
    if has_ffn(cfg, letter):
        terms.update(ffn_terms(cfg, seq_len, ffn_is_moe(cfg, letter)))
    return BlockFlops(letter, count, seq_len, terms, sum(mixer.values()))


def training_flops(cfg: ModelConfig, seq_len: int) -> FlopReport:
    """Training FLOPs of the model ``cfg`` at sequence length ``seq_len``.

    Takes a validated ModelConfig and the training sequence length; returns a FlopReport with
    per-block-type term breakdowns and per-token / per-sample totals (formulas in the module
    docstring). Raises ValueError for a non-positive ``seq_len``.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    pattern = build_layer_pattern(cfg)
    blocks = {
        letter: block_flops(cfg, letter, seq_len, pattern.count(letter))
        for letter in sorted(set(pattern), key=LETTER_ORDER.index)
    }
    return FlopReport(
        pattern=pattern,
        seq_len=seq_len,
        blocks=blocks,
        lm_head_forward=2 * cfg.hidden_size * cfg.vocab_size * seq_len,
    )


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token at ``seq_len``, for MFU.

    Takes the ModelConfig and the training sequence length; returns a float: achieved FLOP/s =
    this * tokens/s. Counts useful work only (causal attention halved, active experts only), not
    recomputation.
    """
    return training_flops(cfg, seq_len).training_per_token
