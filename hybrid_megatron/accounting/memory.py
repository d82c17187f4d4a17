"""Predicted peak GPU memory of one training rank, by part, for a model on a parallel layout.

The peak comes at the start of the first backward pass of the last in-flight micro-batch:
everything resident (weights, gradient buffers, optimizer state) plus the activations every
in-flight micro-batch saved for backward, plus the LM head's logits and the loss's buffers on
the last stage. Parts (bytes per rank):

- weights: the stage's parameters in the training dtype (bf16: 2 bytes; fp32: 4), dense ones
  split over TP, experts over EP x expert TP.
- gradients: megatron-core's fp32 gradient buffer (``grad_reduce_in_fp32``), 4 bytes per local
  parameter; the distributed optimizer reduce-scatters into it, so it is not sharded.
- optimizer: the distributed optimizer's fp32 main weights (bf16 training only) and Adam's two
  moments (fp32, or bf16 with ``train.adam_moments: bf16``), sharded over the data-parallel
  ranks (experts over the expert data-parallel ranks).
- activations: per block, the tensors its sublayers save for backward (bf16 elements per token,
  listed in ``sublayer_saved``), times tokens per micro-batch, times the micro-batches in flight
  on this stage (1F1B: stage s of P holds min(P - s, micro-batches)); divided by TP for the
  TP-split tensors, and by TP for the rest too with sequence parallelism. ``selective``
  recompute drops the attention core's saved inputs (Q, K, V); ``full`` keeps each block's input
  only, plus one block's full activations while it is recomputed.
- moe_dispatch: the permuted token copies an MoE layer keeps (top_k x h in and out per token).
- logits: the last stage's LM-head output and the loss's buffers, LOGIT_BYTES bytes per
  vocabulary entry per token (split over TP), for one micro-batch.
- overhead: CUDA context-free allocator overhead, kernels' workspaces (a constant).

What the model leaves out: FP8 weight copies and scaling state (small next to bf16 weights),
allocator fragmentation (it varies by run: the committed bench measured the same row at 34.5 and
47.5 GiB in a fresh and a reused process), CUDA graphs' private pools, the optimizer step's
temporaries (below the backward peak for these models).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid_megatron.accounting.params import block_params
from hybrid_megatron.config.geometry import (
    attention_dims,
    expert_ffn_size,
    ffn_matrices,
    fused_width,
    mamba_dims,
)
from hybrid_megatron.config.layer_pattern import (
    INTRA,
    ffn_is_moe,
    has_ffn,
    has_mixer,
)
from hybrid_megatron.config.model import ModelConfig

GIB = 2**30
ACT_BYTES = 2  # saved activations are bf16 (fp32 training: see activation_bytes)
# The fused (TE) cross-entropy writes the logits' gradient into the bf16 logits themselves (2
# bytes per entry); the unfused loss keeps fp32 copies as well. Fitted on the committed 1B and
# 350M bench rows (bench/results/2026-12-07_planner_calibration/): 2.0 and 5.6.
LOGIT_BYTES = {True: 2.0, False: 5.6}
OVERHEAD_BYTES = int(0.6 * GIB)  # cuBLAS/TE workspaces, RNG state, the batch, small buffers
RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class RankLayout:
    """Where one rank sits: the parallel sizes and, for pipelines, which blocks its stage holds.

    ``dp`` is the data-parallel size of the dense weights; experts are data-parallel over
    ``dp * tp / (ep * expert_tp)`` ranks (megatron-core carves the expert groups out of the
    stage's dp x tp ranks).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    expert_tp: int = 1
    dp: int = 1
    sequence_parallel: bool = False

    @property
    def expert_dp(self) -> int:
        """Data-parallel ranks that share one shard of the experts."""
        return max(1, self.dp * self.tp // (self.ep * self.expert_tp))


@dataclass(frozen=True)
class TrainingShape:
    """What one step trains: tokens per micro-batch, micro-batches per step and per rank, dtype,
    recompute mode, optimizer moment dtype and whether the fused loss/SwiGLU kernels are on."""

    seq_len: int
    micro_batch: int
    microbatches: int = 1
    precision: str = "bf16"
    recompute: str = "none"
    adam_moments: str = "fp32"
    fused: bool = True

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch."""
        return self.seq_len * self.micro_batch


@dataclass
class MemoryEstimate:
    """Predicted peak bytes of one rank, by part (see the module docstring)."""

    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """All parts together, bytes."""
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        """All parts together, GiB."""
        return self.total / GIB

    @property
    def largest(self) -> tuple[str, float]:
        """(name, bytes) of the largest part."""
        name = max(self.parts, key=lambda k: self.parts[k])
        return name, self.parts[name]

    def gib(self) -> dict[str, float]:
        """The parts in GiB."""
        return {k: v / GIB for k, v in self.parts.items()}


def block_parameters(cfg: ModelConfig, letter: str) -> tuple[int, int]:
    """(dense, expert) parameters of one block of ``letter`` (experts: the routed experts only)."""

    bp = block_params(cfg, letter)
    expert = 0
    if has_ffn(cfg, letter) and ffn_is_moe(cfg, letter):
        assert cfg.moe is not None
        expert = cfg.moe.num_experts * ffn_matrices(cfg) * cfg.hidden_size * expert_ffn_size(cfg)
    return bp.total - expert, expert


def sublayer_saved(cfg: ModelConfig, letter: str, fused: bool = True) -> dict[str, dict[str, float]]:
    """bf16 elements per token one block saves for backward, by sublayer and by what splits.

    Returns ``{sublayer: {"split": n, "replicated": n, "attention_core": n}}``: ``split`` are
    tensors sharded over TP (projection outputs, head-split mixer state), ``replicated`` the
    hidden-size tensors around norms (sharded only with sequence parallelism),
    ``attention_core`` the Q, K, V the attention kernel keeps (dropped by selective recompute;
    TP-split).
    """
    h = cfg.hidden_size
    out: dict[str, dict[str, float]] = {}
    if has_mixer(letter):
        a, m = attention_dims(cfg, letter), mamba_dims(cfg, letter)
        # input norm: its input and output (the projection's input)
        mixer = {"split": 0.0, "replicated": 2.0 * h, "attention_core": 0.0}
        if a is not None:
            # Q, K, V (post-RoPE) for flash attention's backward; its output = out-proj input
            mixer["attention_core"] += a.qkv_width
            mixer["split"] += a.width
        if m is not None:
            # z, xBC, dt from the in-projection, the scan output y and the gated norm's output
            # (out-projection input); the fused conv+scan kernel recomputes the conv output
            # and the chunk states in backward
            mixer["split"] += m.in_proj_width + 2 * m.d_inner
        if letter == INTRA:
            # per-branch norms' outputs and the fused (concatenated) out-projection input
            aw = a.width if a is not None else 0
            mw = m.d_inner if m is not None else 0
            mixer["split"] += aw + mw + fused_width(cfg)
        out["mixer"] = mixer
    if has_ffn(cfg, letter):
        ffn = {"split": 0.0, "replicated": 2.0 * h, "attention_core": 0.0}
        gated = ffn_matrices(cfg) == 3
        if ffn_is_moe(cfg, letter):
            assert cfg.moe is not None
            fe, k = expert_ffn_size(cfg), cfg.moe.top_k
            # fc1 output (2 f for SwiGLU) and the activation's output, per routed copy;
            # router logits and probabilities in fp32
            ffn["split"] += k * fe * (3 if gated else 2) + 4 * cfg.moe.num_experts
            if cfg.moe.shared_expert_ffn_hidden_size:
                fs = cfg.moe.shared_expert_ffn_hidden_size
                ffn["split"] += fs * (3 if gated else 2)
        else:
            f = cfg.ffn_size
            ffn["split"] += f * (3 if gated else 2) + (0 if fused else 2 * f)
        out["ffn"] = ffn
    return out


def moe_dispatch_elements(cfg: ModelConfig, letter: str) -> float:
    """bf16 elements per token an MoE layer's token dispatch keeps: top_k permuted copies of
    the hidden state going in and coming out of the experts (0 for dense blocks)."""
    if not (has_ffn(cfg, letter) and ffn_is_moe(cfg, letter)):
        return 0.0
    assert cfg.moe is not None
    return 2.0 * cfg.moe.top_k * cfg.hidden_size


def block_activation_bytes(
    cfg: ModelConfig, letter: str, shape: TrainingShape, layout: RankLayout
) -> tuple[float, float, float]:
    """(kept, recompute_peak, moe_dispatch) bytes of one block for one micro-batch on this rank.

    ``kept`` is what stays saved until backward under the recompute mode; ``recompute_peak`` the
    extra one block needs while it is recomputed (full recompute only).
    """
    tp = layout.tp
    rep_div = tp if layout.sequence_parallel else 1
    width = activation_bytes(shape)
    full_block = 0.0
    core = 0.0
    for part in sublayer_saved(cfg, letter, shape.fused).values():
        full_block += part["split"] / tp + part["replicated"] / rep_div + part["attention_core"] / tp
        core += part["attention_core"] / tp
    dispatch = moe_dispatch_elements(cfg, letter) / max(1, tp if layout.expert_tp == 1 else tp)
    tokens = shape.tokens
    if shape.recompute == "full":
        kept = cfg.hidden_size / rep_div
        return kept * tokens * width, (full_block + dispatch) * tokens * width, 0.0
    if shape.recompute == "selective":
        full_block -= core
    return full_block * tokens * width, 0.0, dispatch * tokens * width


def activation_bytes(shape: TrainingShape) -> int:
    """Bytes per saved activation element: 2 in bf16 training, 4 in fp32."""
    return ACT_BYTES if shape.precision == "bf16" else 4


def in_flight_microbatches(stage: int, layout: RankLayout, shape: TrainingShape) -> int:
    """Micro-batches whose activations stage ``stage`` (0-based) holds at its peak under 1F1B."""
    return max(1, min(layout.pp - stage, shape.microbatches))


def stage_memory(
    cfg: ModelConfig,
    stage_pattern: str,
    stage: int,
    layout: RankLayout,
    shape: TrainingShape,
) -> MemoryEstimate:
    """Predicted peak memory of a rank of pipeline stage ``stage`` holding ``stage_pattern``.

    The first stage holds the embedding, the last the final norm, the LM head (unless tied
    on one stage) and the loss.
    """
    first, last = stage == 0, stage == layout.pp - 1
    dense, expert = 0.0, 0.0
    for letter in stage_pattern:
        d, e = block_parameters(cfg, letter)
        dense += d
        expert += e
    embed = float(cfg.vocab_size * cfg.hidden_size)
    if first:
        dense += embed
    if last:
        dense += cfg.hidden_size  # final norm
        if not cfg.tie_embeddings or not first:
            dense += embed
    dense_local = dense / layout.tp
    expert_local = expert / (layout.ep * layout.expert_tp)
    bf16 = shape.precision == "bf16"
    weight_bytes = 2 if bf16 else 4
    moment_bytes = 2 if shape.adam_moments == "bf16" else 4
    # fp32 main weights exist only next to bf16 weights; fp32 training steps the weights themselves
    state_bytes = (4 if bf16 else 0) + 2 * moment_bytes
    parts: dict[str, float] = {
        "weights": (dense_local + expert_local) * weight_bytes,
        "gradients": (dense_local + expert_local) * 4,
        "optimizer": dense_local * state_bytes / layout.dp + expert_local * state_bytes / layout.expert_dp,
    }
    kept = recompute_peak = dispatch = 0.0
    for letter in stage_pattern:
        saved, recomputed, dispatched = block_activation_bytes(cfg, letter, shape, layout)
        kept += saved
        recompute_peak = max(recompute_peak, recomputed)
        dispatch += dispatched
    flight = in_flight_microbatches(stage, layout, shape)
    width = activation_bytes(shape)
    rep_div = layout.tp if layout.sequence_parallel else 1
    edge = 0.0
    if last:
        # final norm input/output and the LM head's input
        edge += 3 * cfg.hidden_size / rep_div * shape.tokens * width
    parts["activations"] = (kept + edge) * flight + recompute_peak
    parts["moe_dispatch"] = dispatch * flight
    parts["logits"] = LOGIT_BYTES[shape.fused] * cfg.vocab_size / layout.tp * shape.tokens if last else 0.0
    parts["overhead"] = float(OVERHEAD_BYTES)
    return MemoryEstimate(parts)


def predict_memory(
    cfg: ModelConfig, stages: list[str], layout: RankLayout, shape: TrainingShape
) -> list[MemoryEstimate]:
    """Predicted peak memory of each pipeline stage's ranks (``stages``: one sub-pattern each)."""
    return [stage_memory(cfg, s, i, layout, shape) for i, s in enumerate(stages)]
