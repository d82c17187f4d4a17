"""Predicted peak GPU memory of one training rank, by part, for a model on a parallel layout.

The peak comes at the start of the first backward pass of the last in-flight micro-batch:
everything resident (weights, gradient buffers, optimizer state) plus the activations every
in-flight micro-batch saved for backward, plus the LM head's logits and the loss's buffers on
the last stage; or, with bf16 Adam moments, in the optimizer step. Parts (bytes per rank):

- weights: the stage's parameters in the training dtype (bf16: 2 bytes; fp32: 4), dense ones
  split over TP, experts over EP x expert TP.
- gradients: megatron-core's fp32 gradient buffer (``grad_reduce_in_fp32``), 4 bytes per local
  parameter; the distributed optimizer reduce-scatters into it, so it is not sharded.
- optimizer: the distributed optimizer's fp32 main weights (bf16 training only) and Adam's two
  moments (fp32, or bf16 with ``train.adam_moments: bf16``), sharded over the data-parallel
  ranks (experts over the expert data-parallel ranks). With bf16 moments (megatron-core's
  precision-aware optimizer, Transformer Engine's fused Adam) a main weight is the bf16 weight
  plus a 16-bit remainder: 2 bytes, not 4.
- optimizer_step (bf16 moments only): TE's fused Adam unscales both moments of every parameter
  it steps into fp32 copies before its kernel runs, 8 bytes per optimizer parameter, while the
  weights, gradients and state stay resident and the activations are freed. When that phase
  is the larger, it is the peak and the estimate holds its parts instead (the committed 1B MoE
  peaks, 64.9-65.7 GiB whatever the recompute mode and micro-batch count, are this phase's).
- activations: per block, the tensors its sublayers save for backward (bf16 elements per token,
  listed in ``sublayer_saved``), times tokens per micro-batch, times the micro-batches in flight
  on this stage (1F1B: stage s of P holds min(P - s, micro-batches)); divided by TP for the
  TP-split tensors, and by TP for the rest too with sequence parallelism. ``selective``
  recompute drops the attention core's saved inputs (Q, K, V); ``full`` keeps each block's input
  only, plus one block's full activations while it is recomputed. That block is recomputed
  after the LM head's backward has freed the logits, so on the last stage the peak holds the
  larger of the two, not both (the committed 1B full-recompute peaks at micro-batch 2-16 follow
  the logits' phase to 1%).
- moe_dispatch: the permuted token copies an MoE layer keeps (top_k x h in and out per token).
  With TP, megatron-core's dispatcher all-gathers the copies going into the experts over the
  expert-TP ranks after its all-to-all (the experts' first GEMM saves them), and reduce-scatters
  their outputs back: a rank keeps expert_tp / tp of its micro-batch's input copies and 1 / tp
  of the output copies (read from megatron-core 0.16's alltoall dispatcher; not yet measured:
  the 2-GPU record's TP layouts ran an older branch norm).
- logits: the last stage's LM-head output and the loss's buffers, LOGIT_BYTES bytes per
  vocabulary entry per token (split over TP), for one micro-batch (+ FP8_HEAD_GRAD_BYTES with
  an FP8 LM head).
- overhead: CUDA context-free allocator overhead, kernels' workspaces (a constant).
- fp8_weights (``model.fp8``): Transformer Engine 2.x keeps, per Linear that runs in FP8 on
  Hopper, an FP8 copy of its weight and of the weight's transpose (row- and column-wise usage),
  cached across the step's micro-batches: 2 bytes per parameter of every TE GEMM (projections,
  dense FFNs, shared experts, experts of ``te_grouped``/``sequential``; the LM head only with
  ``fp8_output_layer``; not the router). The project's own FP8 grouped experts (``grouped``)
  keep the same two copies, made on each step's first micro-batch. The 2 bytes are TE's documented Hopper
  behaviour (an assumption: TE's source is not in this project's CPU environment); the
  committed FP8 rows' peaks agree within 10% (bench/results/2026-12-07_planner_calibration/).
  FP8 also saves a Linear's input for its weight gradient as FP8 (1 byte instead of 2): the
  activations lose 1 byte per element of each tensor saved only as a GEMM input (the norms'
  outputs, the Mamba gated norm's and the intra fusion's outputs, the FFN's fc2 input) and gain
  1 byte per element of the attention output (flash attention keeps its bf16 copy and the
  out-projection adds an FP8 one).
- context parallelism (``parallel.cp``): every rank holds seq_len / cp positions of each
  sequence, so activations, MoE dispatch copies and logits divide by cp; the optimizer state
  shards over dp x cp ranks (megatron-core's gradient and distributed-optimizer group includes
  the CP ranks), experts over the expert data-parallel ranks carved from tp x cp x dp.
  ``cp_buffers`` is what one layer's CP exchange holds while it runs (one layer at a time, so
  the largest layer's, not a sum): attention with ``cp_comm: all_gather`` the full-sequence K/V
  and their gradients; ``p2p`` two K/V blocks (the one in use and the next in the ring) and, in
  backward, two dK/dV blocks; ``a2a`` one head-split copy of Q, K, V and the output. Mamba
  ``mamba_cp: heads``: one all-to-all copy of the in-projection output and the scan output;
  ``sequence``: the all-gathered segment states and decays (fp32, small), and its unfused
  conv + scan path saves the conv1d output (conv_dim per position) that the fused kernel
  recomputes.

What the model leaves out: allocator fragmentation, CUDA graphs' private pools, the optimizer
step's temporaries with fp32 moments (norm buffers, small), FP8 scaling state (a few KiB per
Linear).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from hybrid_megatron.accounting.flops import block_flops
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
# With model.fp8_output_layer the LM head is a TE Linear whose backward does not take the logits'
# gradient in place: one more bf16 tensor of the logits' size. Set from the committed FP8-head
# rows (bench/results/train_throughput_h100_2026-11-24_fp8_head, run28 against run27: +4.3 GiB
# at 2 x 8K tokens and 128K vocabulary, of which the head's FP8 weight copies are 0.5).
FP8_HEAD_GRAD_BYTES = 2.0
# What stays allocated through the optimizer step (activations, dispatch copies and logits are freed)
STEP_RESIDENT = ("weights", "fp8_weights", "gradients", "optimizer", "overhead")
OVERHEAD_BYTES = int(0.6 * GIB)  # cuBLAS/TE workspaces, RNG state, the batch, small buffers
RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class RankLayout:
    """Where one rank sits: the parallel sizes and how context parallelism exchanges.

    ``dp`` is the data-parallel size (ranks that see different samples); experts are
    data-parallel over ``dp * cp * tp / (ep * expert_tp)`` ranks (megatron-core carves the expert
    groups out of the stage's dp x cp x tp ranks). ``cp_comm`` and ``mamba_cp`` are the recipe's
    ``parallel.cp_comm`` and ``parallel.mamba_cp``.
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    expert_tp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    cp: int = 1
    cp_comm: str = "p2p"
    mamba_cp: str = "sequence"

    @property
    def expert_dp(self) -> int:
        """Data-parallel ranks that share one shard of the experts."""
        return max(1, self.dp * self.cp * self.tp // (self.ep * self.expert_tp))

    @property
    def grad_ranks(self) -> int:
        """Ranks that reduce the dense weights' gradients and shard their optimizer state:
        data parallel x context parallel."""
        return self.dp * self.cp

    @property
    def gpus(self) -> int:
        """Ranks of the whole job: tp x cp x pp x dp."""
        return self.tp * self.cp * self.pp * self.dp


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


def te_experts(cfg: ModelConfig) -> bool:
    """Whether the routed experts are Transformer Engine layers (``te_grouped``, ``sequential``),
    which save their inputs for the weight gradient in FP8; the project's ``grouped`` experts
    save them in bf16."""
    return cfg.moe is not None and cfg.moe.experts != "grouped"


def sublayer_saved(cfg: ModelConfig, letter: str, fused: bool = True) -> dict[str, dict[str, float]]:
    """bf16 elements per token one block saves for backward, by sublayer and by what splits.

    Returns ``{sublayer: {"split": n, "replicated": n, "attention_core": n, "fp8_split": d,
    "fp8_replicated": d}}``: ``split`` are tensors sharded over TP (projection outputs,
    head-split mixer state), ``replicated`` the hidden-size tensors around norms (sharded only
    with sequence parallelism), ``attention_core`` the Q, K, V the attention kernel keeps
    (dropped by selective recompute; TP-split). ``fp8_*`` are the bytes per token FP8 GEMMs
    change (split over TP, or replicated): -1 per element saved only as a GEMM input (kept in
    FP8), +1 per element of the attention output (an FP8 copy next to flash attention's).
    """
    h = cfg.hidden_size
    out: dict[str, dict[str, float]] = {}
    if has_mixer(letter):
        a, m = attention_dims(cfg, letter), mamba_dims(cfg, letter)
        # input norm: its input and output (the projection's input)
        mixer = {"split": 0.0, "replicated": 2.0 * h, "attention_core": 0.0}
        mixer.update(fp8_split=0.0, fp8_replicated=-1.0 * h)
        if a is not None:
            # Q, K, V (post-RoPE) for flash attention's backward; its output = out-proj input
            mixer["attention_core"] += a.qkv_width
            mixer["split"] += a.width
            mixer["fp8_split"] += a.width if letter != INTRA else 0.0
        if m is not None:
            # z, xBC, dt from the in-projection, the scan output y and the gated norm's output
            # (out-projection input); the fused conv+scan kernel recomputes the conv output
            # and the chunk states in backward
            mixer["split"] += m.in_proj_width + 2 * m.d_inner
            mixer["fp8_split"] -= m.d_inner if letter != INTRA else 0.0
        if letter == INTRA:
            # per-branch norms' outputs and the fused (concatenated) out-projection input
            aw = a.width if a is not None else 0
            mw = m.d_inner if m is not None else 0
            mixer["split"] += aw + mw + fused_width(cfg)
            mixer["fp8_split"] -= fused_width(cfg)
        out["mixer"] = mixer
    if has_ffn(cfg, letter):
        ffn = {"split": 0.0, "replicated": 2.0 * h, "attention_core": 0.0}
        ffn.update(fp8_split=0.0, fp8_replicated=-1.0 * h)
        gated = ffn_matrices(cfg) == 3
        if ffn_is_moe(cfg, letter):
            assert cfg.moe is not None
            fe, k = expert_ffn_size(cfg), cfg.moe.top_k
            # fc1 output (2 f for SwiGLU) and the activation's output, per routed copy;
            # router logits and probabilities in fp32
            ffn["split"] += k * fe * (3 if gated else 2) + 4 * cfg.moe.num_experts
            if te_experts(cfg):
                ffn["fp8_split"] -= k * fe
            if cfg.moe.shared_expert_ffn_hidden_size:
                fs = cfg.moe.shared_expert_ffn_hidden_size
                ffn["split"] += fs * (3 if gated else 2)
                ffn["fp8_split"] -= fs
        else:
            f = cfg.ffn_size
            ffn["split"] += f * (3 if gated else 2) + (0 if fused else 2 * f)
            ffn["fp8_split"] -= f
        out["ffn"] = ffn
    return out


def moe_dispatch_elements(cfg: ModelConfig, letter: str) -> float:
    """bf16 elements per token an MoE layer's token dispatch keeps: top_k permuted copies of
    the hidden state going in and coming out of the experts (0 for dense blocks)."""
    if not (has_ffn(cfg, letter) and ffn_is_moe(cfg, letter)):
        return 0.0
    assert cfg.moe is not None
    return 2.0 * cfg.moe.top_k * cfg.hidden_size


def rank_tokens(shape: TrainingShape, layout: RankLayout) -> float:
    """Positions of one micro-batch this rank holds: its tokens split over the CP ranks."""
    return shape.tokens / layout.cp


def fp8_gemms(cfg: ModelConfig, shape: TrainingShape) -> bool:
    """Whether the model's GEMMs run in FP8 (``model.fp8`` in bf16 training)."""
    return cfg.fp8 is not None and shape.precision == "bf16"


def mamba_sequence_cp(layout: RankLayout) -> bool:
    """Whether Mamba mixers run the sequence-sharded scan (cp > 1, ``mamba_cp: sequence``)."""
    return layout.cp > 1 and layout.mamba_cp == "sequence"


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
    fp8 = fp8_gemms(cfg, shape)
    full_block = 0.0
    core = 0.0
    fp8_bytes = 0.0
    for part in sublayer_saved(cfg, letter, shape.fused).values():
        full_block += part["split"] / tp + part["replicated"] / rep_div + part["attention_core"] / tp
        core += part["attention_core"] / tp
        if fp8:
            fp8_bytes += part["fp8_split"] / tp + part["fp8_replicated"] / rep_div
    m = mamba_dims(cfg, letter)
    if m is not None and mamba_sequence_cp(layout):
        full_block += m.conv_dim / tp  # the unfused conv's output, saved for the scan's backward
    # the copies going in are gathered over the expert-TP ranks, those coming out are not
    dispatch = moe_dispatch_elements(cfg, letter) * (layout.expert_tp + 1) / (2 * tp)
    tokens = rank_tokens(shape, layout)
    if shape.recompute == "full":
        kept = cfg.hidden_size / rep_div
        return kept * tokens * width, (full_block * width + fp8_bytes + dispatch * width) * tokens, 0.0
    if shape.recompute == "selective":
        full_block -= core
    return (full_block * width + fp8_bytes) * tokens, 0.0, dispatch * tokens * width


def cp_buffer_bytes(cfg: ModelConfig, letter: str, shape: TrainingShape, layout: RankLayout) -> float:
    """Bytes one block's context-parallel exchange holds while it runs (see the module docstring)."""
    if layout.cp == 1:
        return 0.0
    cp, tp, width = layout.cp, layout.tp, activation_bytes(shape)
    full = float(shape.tokens)  # positions of one micro-batch over the whole sequence
    out = 0.0
    a, m = attention_dims(cfg, letter), mamba_dims(cfg, letter)
    if a is not None:
        kv = 2 * a.groups * a.head_dim / tp  # K and V channels on this TP rank
        if layout.cp_comm == "all_gather":
            out += 2 * kv * full * width  # gathered K/V, and their gradients in backward
        elif layout.cp_comm == "p2p":
            out += 4 * kv * full / cp * width  # two K/V blocks, two dK/dV blocks
        else:
            out += (a.qkv_width + a.width) / tp * full / cp * width
    if m is not None:
        if layout.mamba_cp == "heads":
            out += (m.in_proj_width + m.d_inner) / tp * full / cp * width
        else:
            states = m.heads / tp * (m.head_dim * m.state + 1)  # final states and total decays
            out += 2 * cp * states * shape.micro_batch * 4  # two segments per rank, fp32
    return out


def fp8_weight_parameters(cfg: ModelConfig, letter: str) -> tuple[float, float]:
    """(dense, expert) parameters of one block whose GEMM weights are kept in FP8 copies too
    (by Transformer Engine, and by the project's grouped experts alike)."""
    terms = block_flops(cfg, letter, 1).terms
    dense = sum(terms.get(n, 0) for n in ("qkv_proj", "out_proj", "in_proj", "ffn", "moe_shared")) / 2
    expert = float(block_parameters(cfg, letter)[1])
    return dense, expert


def activation_bytes(shape: TrainingShape) -> int:
    """Bytes per saved activation element: 2 in bf16 training, 4 in fp32."""
    return ACT_BYTES if shape.precision == "bf16" else 4


def in_flight_microbatches(stage: int, layout: RankLayout, shape: TrainingShape) -> int:
    """Micro-batches whose activations stage ``stage`` (0-based) holds at its peak under 1F1B."""
    return max(1, min(layout.pp - stage, shape.microbatches))


@dataclass(frozen=True)
class BlockMemory:
    """One block's share of a stage's memory: its (dense, expert) parameters, those with FP8
    copies, and its activation bytes for one micro-batch (``block_activation_bytes``) and CP
    buffers (``cp_buffer_bytes``)."""

    dense: float
    expert: float
    fp8_dense: float
    fp8_expert: float
    kept: float
    recompute_peak: float
    dispatch: float
    cp_buffers: float


@lru_cache(maxsize=4096)
def block_memory(cfg: ModelConfig, letter: str, shape: TrainingShape, layout: RankLayout) -> BlockMemory:
    """The BlockMemory of a block of ``letter`` (cached: the balanced split prices every
    contiguous run of blocks, so each block type is priced many times per layout)."""
    dense, expert = block_parameters(cfg, letter)
    fp8_dense, fp8_expert = fp8_weight_parameters(cfg, letter)
    kept, recompute_peak, dispatch = block_activation_bytes(cfg, letter, shape, layout)
    buffers = cp_buffer_bytes(cfg, letter, shape, layout)
    return BlockMemory(dense, expert, fp8_dense, fp8_expert, kept, recompute_peak, dispatch, buffers)


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
    per_letter = {c: block_memory(cfg, c, shape, layout) for c in set(stage_pattern)}
    counts = Counter(stage_pattern)
    dense = sum(per_letter[c].dense * n for c, n in counts.items())
    expert = sum(per_letter[c].expert * n for c, n in counts.items())
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
    bf16_moments = shape.adam_moments == "bf16"
    moment_bytes = 2 if bf16_moments else 4
    # fp32 main weights exist only next to bf16 weights (fp32 training steps the weights
    # themselves); with bf16 moments TE's fused Adam keeps each as the bf16 weight plus a 16-bit
    # remainder (megatron-core's store_param_remainders)
    main_bytes = (2 if bf16_moments else 4) if bf16 else 0
    state_bytes = main_bytes + 2 * moment_bytes
    optimizer_params = dense_local / layout.grad_ranks + expert_local / layout.expert_dp
    parts: dict[str, float] = {
        "weights": (dense_local + expert_local) * weight_bytes,
        "gradients": (dense_local + expert_local) * 4,
        "optimizer": optimizer_params * state_bytes,
    }
    fp8 = fp8_gemms(cfg, shape)
    if fp8:
        fp8_dense = sum(per_letter[c].fp8_dense * n for c, n in counts.items())
        fp8_expert = sum(per_letter[c].fp8_expert * n for c, n in counts.items())
        if last and cfg.fp8_output_layer:
            fp8_dense += embed
        parts["fp8_weights"] = 2 * (fp8_dense / layout.tp + fp8_expert / (layout.ep * layout.expert_tp))
    kept = sum(per_letter[c].kept * n for c, n in counts.items())
    dispatch = sum(per_letter[c].dispatch * n for c, n in counts.items())
    recompute_peak = max((m.recompute_peak for m in per_letter.values()), default=0.0)
    buffers = max((m.cp_buffers for m in per_letter.values()), default=0.0)
    flight = in_flight_microbatches(stage, layout, shape)
    width = activation_bytes(shape)
    rep_div = layout.tp if layout.sequence_parallel else 1
    tokens = rank_tokens(shape, layout)
    edge = 0.0
    if last:
        # final norm input/output and the LM head's input
        edge += 3 * cfg.hidden_size / rep_div * tokens * width
    logit_bytes = LOGIT_BYTES[shape.fused] + (FP8_HEAD_GRAD_BYTES if cfg.fp8_output_layer and fp8 else 0.0)
    logits = logit_bytes * cfg.vocab_size / layout.tp * tokens if last else 0.0
    # the recomputed block and the head's logits and inputs are never alive together
    parts["activations"] = kept * flight + edge + max(recompute_peak - edge - logits, 0.0)
    parts["moe_dispatch"] = dispatch * flight
    parts["cp_buffers"] = buffers
    parts["logits"] = logits
    parts["overhead"] = float(OVERHEAD_BYTES)
    if bf16_moments:
        # TE's fused Adam steps bf16 moments through fp32 copies of both, made for every
        # parameter of the step at once: after the backward, so the activations are gone
        resident = {k: parts.get(k, 0.0) for k in STEP_RESIDENT}
        copies = optimizer_params * 2 * 4
        if sum(resident.values()) + copies > sum(parts.values()):
            return MemoryEstimate({**resident, "optimizer_step": copies})
    return MemoryEstimate(parts)


def predict_memory(
    cfg: ModelConfig, stages: list[str], layout: RankLayout, shape: TrainingShape
) -> list[MemoryEstimate]:
    """Predicted peak memory of each pipeline stage's ranks (``stages``: one sub-pattern each)."""
    return [stage_memory(cfg, s, i, layout, shape) for i, s in enumerate(stages)]
