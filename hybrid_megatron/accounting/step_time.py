"""Predicted time of one training step from FLOPs per block, a GPU cost table and link speeds.

The model (deliberately simple; every number it uses is in ``gpu_costs/<gpu>.yaml``):

- compute: each FLOP term of ``accounting.flops`` belongs to an op class (``OP_CLASS``); a
  block's GPU time is its training FLOPs (3 x forward; + 1 x forward of the recomputed part under
  ``full`` recompute, + the attention core's forward under ``selective``) per class divided by
  the class's achieved TFLOP/s. TP divides a block's FLOPs by tp (experts: their tokens spread
  over the stage's TP ranks); the LM head's FLOPs are split over TP too. The rates do not depend
  on the model's width: the H100 rows run on CUDA graphs (no host time) show 350M-wide GEMMs near
  the rates fitted to 1B-wide ones.
- host: eager PyTorch launches every kernel from Python, a fixed time per sublayer that neither
  the tokens, the width nor TP shrink: ``host_s_per_mixer`` per mixer branch (Mamba2 or
  attention; an intra block has both), ``host_s_per_ffn`` per FFN, + ``host_s_per_moe`` per MoE
  FFN (router, permutation, the grouped GEMMs' setup); x 4/3 under ``full`` recompute (the
  forward again). The GPU runs behind the host, so a block takes the longer of its GPU and host
  time: small models (350M, width 1024) are host-bound (the profiles show the GPU busy 41-45% of
  a step), 1B ones GPU-bound (busy ~90%). Experts other than ``grouped`` synchronise the host
  with the GPU once per MoE layer (token counts read back), which adds ``moe_host_sync_s``.
- TP: per sublayer and micro-batch, forward and backward each move the [tokens, h] bf16
  activations once through an all-reduce (or all-gather + reduce-scatter with sequence
  parallelism; the same bytes): 2 x 2 x (tp-1)/tp x tokens x h x 2 bytes at the link's bus
  bandwidth, plus a fixed latency per collective.
- EP: per MoE layer and micro-batch, dispatch and combine, forward and backward: 4 all-to-alls
  of top_k x tokens x h x 2 bytes x (ep-1)/ep.
- PP: 1F1B, (micro-batches + pp - 1) x the slowest stage's micro-batch time, plus a
  point-to-point send of the [tokens, h] activations per stage boundary, forward and backward.
- DP: the distributed optimizer's gradient reduce-scatter (fp32) and weight all-gather (bf16)
  of the rank's parameters, not overlapped with compute (``overlap_grad_reduce`` is off).
- optimizer: a fixed time per locally updated parameter (the Adam step streams its state
  through HBM), plus a fixed time per step (launches, the loss's host sync).

- FP8 (``model.fp8``): the GEMMs Transformer Engine runs in FP8 (projections, dense FFNs,
  shared and routed experts; the LM head with ``fp8_output_layer``; not the router) run at
  ``tflops.gemm_fp8``, which absorbs the casts to FP8; every sublayer adds ``host_s_fp8`` of
  host time (TE's FP8 bookkeeping per Linear). Both are fitted on the FP8 bench rows after, and
  apart from, the bf16 fit (the bf16 rates stay those of the bf16 rows). The attention core
  stays at the bf16 rate with ``fp8_attention`` too (two measured rows; not modelled).
- CP (``parallel.cp``): each rank computes seq_len / cp positions; the causal attention core's
  FLOPs divide by cp too, because the 2 x cp chunk order gives every rank the same share of
  (query, key) pairs. Attention exchanges K/V each micro-batch, forward and backward:
  ``all_gather`` 3 collectives (gather, gather again in backward, reduce-scatter of dK/dV) of
  the full-sequence K/V, not overlapped; ``p2p`` the same bytes around the ring, overlapped
  with the attention core (only what exceeds the core's time counts); ``a2a`` Q, K, V in and
  the output back, forward and backward. Mamba ``heads`` all-to-alls the in-projection output
  in and the scan output back; ``sequence`` all-gathers the segments' states and the conv
  halos (small: the latency counts). The CP group spans tp x cp ranks; data-parallel reduction
  and the optimizer shard run over dp x cp ranks. Host time does not grow with cp (not
  measured; CP is for long sequences, where blocks are GPU-bound).

A group of ranks is inside one node when the layout's ranks fit ``gpus_per_node`` (TP, CP, EP
innermost), and uses the node's link; else the network's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from hybrid_megatron.accounting.flops import block_flops, model_flops_per_token
from hybrid_megatron.accounting.memory import (
    RankLayout,
    TrainingShape,
    block_parameters,
    fp8_gemms,
    rank_tokens,
)
from hybrid_megatron.config.geometry import attention_dims, mamba_dims
from hybrid_megatron.config.layer_pattern import (
    ATTENTION_LETTERS,
    INTRA,
    MAMBA,
    ffn_is_moe,
    has_ffn,
    has_mixer,
)
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.errors import InputError

COSTS_DIR = Path(__file__).resolve().parent / "gpu_costs"

# Which achieved rate each FLOP term of accounting.flops runs at.
OP_CLASS = {
    "qkv_proj": "gemm",
    "out_proj": "gemm",
    "in_proj": "gemm",
    "ffn": "gemm",
    "moe_shared": "gemm",
    "moe_router": "gemm",
    "attn_scores": "attention",
    "attn_values": "attention",
    "conv1d": "ssd",
    "ssd_intra_chunk": "ssd",
    "ssd_state": "ssd",
    "moe_experts": "experts",
    "lm_head": "gemm",
}
ATTENTION_CORE = ("attn_scores", "attn_values")
# The terms Transformer Engine runs in FP8 under model.fp8 (the router stays in higher precision).
FP8_TERMS = ("qkv_proj", "out_proj", "in_proj", "ffn", "moe_shared", "moe_experts")


class UnknownGpuError(InputError, ValueError):
    """No cost table for the named GPU type."""


@dataclass(frozen=True)
class GpuCosts:
    """One GPU type's cost table (``gpu_costs/<name>.yaml``; fields documented there)."""

    name: str
    memory_gib: float
    peak_tflops: float
    tflops: dict[str, float]
    host_s_per_mixer: float
    host_s_per_ffn: float
    host_s_per_moe: float
    moe_host_sync_s: float
    optimizer_s_per_param: float
    step_overhead_s: float
    node_bus_gbps: float
    network_bus_gbps: float
    collective_latency_s: float
    gpus_per_node: int
    host_s_fp8: float = 0.0


def available_gpus() -> list[str]:
    """Names of the GPU types with a committed cost table."""
    return sorted(p.stem for p in COSTS_DIR.glob("*.yaml"))


@cache
def load_costs(name: str = "h100") -> GpuCosts:
    """The cost table of GPU type ``name`` (e.g. ``h100``); UnknownGpuError for another."""
    path = COSTS_DIR / f"{name.lower()}.yaml"
    if not path.is_file():
        raise UnknownGpuError(f"GPU type {name!r}: no cost table (known: {', '.join(available_gpus())})")
    raw = yaml.safe_load(path.read_text())
    return GpuCosts(name=name.lower(), **raw)


def _group_bandwidth(costs: GpuCosts, span: int) -> float:
    """Bus bandwidth in bytes/s of a collective over ranks ``span`` apart at most."""
    gbps = costs.node_bus_gbps if span <= costs.gpus_per_node else costs.network_bus_gbps
    return gbps * 1e9


def term_rate(name: str, cfg: ModelConfig, shape: TrainingShape, costs: GpuCosts) -> float:
    """Achieved TFLOP/s of FLOP term ``name`` of ``accounting.flops`` (FP8 GEMMs: gemm_fp8)."""
    if name in FP8_TERMS and fp8_gemms(cfg, shape):
        return costs.tflops["gemm_fp8"]
    return costs.tflops[OP_CLASS[name]]


def block_gpu_seconds(
    cfg: ModelConfig, letter: str, shape: TrainingShape, layout: RankLayout, costs: GpuCosts
) -> float:
    """Forward + backward GPU time of one block's FLOPs for one micro-batch on one rank."""
    return sum(block_term_seconds(cfg, letter, shape, layout, costs).values())


def block_term_seconds(
    cfg: ModelConfig, letter: str, shape: TrainingShape, layout: RankLayout, costs: GpuCosts
) -> dict[str, float]:
    """Forward + backward GPU seconds of each FLOP term of one block for one micro-batch on one
    rank (split over TP and, by the balanced chunk order, over CP)."""
    terms = block_flops(cfg, letter, shape.seq_len).terms
    out = {}
    for name, fwd in terms.items():
        passes = 3.0
        if shape.recompute == "full" or (shape.recompute == "selective" and name in ATTENTION_CORE):
            passes += 1.0
        flops = fwd * shape.micro_batch * passes / (layout.tp * layout.cp)
        out[name] = flops / (term_rate(name, cfg, shape, costs) * 1e12)
    return out


def block_host_seconds(cfg: ModelConfig, letter: str, shape: TrainingShape, costs: GpuCosts) -> float:
    """Forward + backward host (kernel launch) time of one block for one micro-batch."""
    branches = int(letter in (MAMBA, INTRA)) + int(letter in (*ATTENTION_LETTERS, INTRA))
    seconds = branches * costs.host_s_per_mixer
    if has_ffn(cfg, letter):
        seconds += costs.host_s_per_ffn
        if ffn_is_moe(cfg, letter):
            seconds += costs.host_s_per_moe
    if fp8_gemms(cfg, shape):
        seconds += costs.host_s_fp8 * (int(has_mixer(letter)) + int(has_ffn(cfg, letter)))
    return seconds * (4 / 3 if shape.recompute == "full" else 1.0)


def block_compute_seconds(
    cfg: ModelConfig, letter: str, shape: TrainingShape, layout: RankLayout, costs: GpuCosts
) -> float:
    """Forward + backward time of one block for one micro-batch on one rank: the longer of its
    GPU and host time, + the host sync of experts that read their token counts back."""
    seconds = max(
        block_gpu_seconds(cfg, letter, shape, layout, costs), block_host_seconds(cfg, letter, shape, costs)
    )
    if has_ffn(cfg, letter) and ffn_is_moe(cfg, letter):
        assert cfg.moe is not None
        if cfg.moe.experts != "grouped":
            seconds += costs.moe_host_sync_s * (2.0 if shape.recompute == "full" else 1.0)
    return seconds


def cp_comm_seconds(
    cfg: ModelConfig, letter: str, shape: TrainingShape, layout: RankLayout, costs: GpuCosts
) -> float:
    """Context-parallel communication time of one block for one micro-batch on one rank (the
    exposed part: p2p overlaps with the attention core)."""
    cp, tp = layout.cp, layout.tp
    if cp == 1:
        return 0.0
    bw = _group_bandwidth(costs, tp * cp)
    lat = costs.collective_latency_s
    full = shape.tokens  # positions of one micro-batch over the whole sequence
    share = (cp - 1) / cp
    seconds = 0.0
    a, m = attention_dims(cfg, letter), mamba_dims(cfg, letter)
    if a is not None:
        kv_bytes = 2 * a.groups * a.head_dim / tp * full * 2  # full-sequence K and V, bf16
        if layout.cp_comm == "all_gather":
            seconds += 3 * (share * kv_bytes / bw + lat)
        elif layout.cp_comm == "p2p":
            ring = 3 * share * kv_bytes / bw
            terms = block_term_seconds(cfg, letter, shape, layout, costs)
            core = sum(terms.get(n, 0.0) for n in ATTENTION_CORE)
            seconds += max(0.0, ring - core) + 3 * lat
        else:
            volume = 2 * (a.qkv_width + a.width) / tp * full / cp * 2 * share
            seconds += volume / bw + 4 * lat
    if m is not None:
        if layout.mamba_cp == "heads":
            volume = 2 * (m.in_proj_width + m.d_inner) / tp * full / cp * 2 * share
            seconds += volume / bw + 4 * lat
        else:
            states = m.heads / tp * (m.head_dim * m.state + 1) * shape.micro_batch * 4 * 2 * cp
            seconds += 2 * states / bw + 4 * lat
    return seconds


def block_comm_seconds(
    cfg: ModelConfig, letter: str, shape: TrainingShape, layout: RankLayout, costs: GpuCosts
) -> float:
    """TP, CP and EP communication time of one block for one micro-batch on one rank."""
    h, tokens = cfg.hidden_size, rank_tokens(shape, layout)
    seconds = 0.0
    sublayers = int(has_mixer(letter)) + int(has_ffn(cfg, letter))
    if layout.tp > 1:
        volume = 2 * 2 * (layout.tp - 1) / layout.tp * tokens * h * 2
        bw = _group_bandwidth(costs, layout.tp)
        seconds += sublayers * (volume / bw + 4 * costs.collective_latency_s)
    if layout.ep > 1 and has_ffn(cfg, letter) and ffn_is_moe(cfg, letter):
        assert cfg.moe is not None
        volume = 4 * cfg.moe.top_k * tokens / layout.tp * h * 2 * (layout.ep - 1) / layout.ep
        bw = _group_bandwidth(costs, layout.ep * layout.tp)
        seconds += volume / bw + 4 * costs.collective_latency_s
    return seconds + cp_comm_seconds(cfg, letter, shape, layout, costs)


def head_seconds(cfg: ModelConfig, layout: RankLayout, shape: TrainingShape, costs: GpuCosts) -> float:
    """Forward + backward GPU seconds of the LM head for one micro-batch on one rank."""
    flops = 2 * cfg.hidden_size * cfg.vocab_size * rank_tokens(shape, layout) * 3 / layout.tp
    rate = costs.tflops["gemm_fp8" if cfg.fp8_output_layer and fp8_gemms(cfg, shape) else "gemm"]
    return flops / (rate * 1e12)


def stage_seconds(
    cfg: ModelConfig,
    stage_pattern: str,
    stage: int,
    layout: RankLayout,
    shape: TrainingShape,
    costs: GpuCosts,
) -> float:
    """Forward + backward time of one micro-batch through pipeline stage ``stage``."""
    seconds = sum(
        block_compute_seconds(cfg, c, shape, layout, costs) + block_comm_seconds(cfg, c, shape, layout, costs)
        for c in stage_pattern
    )
    if stage == layout.pp - 1:
        seconds += head_seconds(cfg, layout, shape, costs)
    return seconds


@dataclass(frozen=True)
class StepTime:
    """Predicted step time and its parts (seconds), tokens/s of the job and per GPU, MFU."""

    step_s: float
    pipeline_s: float
    dp_s: float
    optimizer_s: float
    stage_s: tuple[float, ...]
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    mfu: float


def predict_step(
    cfg: ModelConfig,
    stages: list[str],
    layout: RankLayout,
    shape: TrainingShape,
    costs: GpuCosts,
) -> StepTime:
    """Predicted time of one optimizer step of the whole job (see the module docstring).

    ``shape.microbatches`` is the micro-batches each data-parallel rank runs per step.
    """
    per_stage = tuple(stage_seconds(cfg, s, i, layout, shape, costs) for i, s in enumerate(stages))
    pipeline = (shape.microbatches + layout.pp - 1) * max(per_stage)
    if layout.pp > 1:
        p2p = (
            rank_tokens(shape, layout)
            * cfg.hidden_size
            * 2
            / _group_bandwidth(costs, layout.tp * layout.cp * layout.pp)
        )
        pipeline += 2 * (shape.microbatches + layout.pp - 1) * (p2p + costs.collective_latency_s)
    # the largest stage's parameters set the data-parallel and optimizer time
    local = 0.0
    for i, s in enumerate(stages):
        dense = sum(block_parameters(cfg, c)[0] for c in s)
        expert = sum(block_parameters(cfg, c)[1] for c in s)
        embed = cfg.vocab_size * cfg.hidden_size
        dense += embed * ((i == 0) + (i == len(stages) - 1 and not (cfg.tie_embeddings and i == 0)))
        local = max(local, dense / layout.tp + expert / (layout.ep * layout.expert_tp))
    dp_s = 0.0
    ranks = layout.grad_ranks
    if ranks > 1:
        volume = (4 + 2) * local * (ranks - 1) / ranks
        dp_s = volume / _group_bandwidth(costs, layout.gpus) + 2 * costs.collective_latency_s
    optimizer_s = costs.optimizer_s_per_param * local / ranks + costs.step_overhead_s
    step = pipeline + dp_s + optimizer_s
    gpus = layout.gpus
    tokens = shape.tokens * shape.microbatches * layout.dp
    tps = tokens / step
    mfu = model_flops_per_token(cfg, shape.seq_len) * tps / (gpus * costs.peak_tflops * 1e12)
    return StepTime(step, pipeline, dp_s, optimizer_s, per_stage, tps, tps / gpus, mfu)
