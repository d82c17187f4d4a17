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

A group of ranks is inside one node when the layout's ranks fit ``gpus_per_node`` (TP, EP
innermost), and uses the node's link; else the network's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from hybrid_megatron.accounting.flops import block_flops, model_flops_per_token
from hybrid_megatron.accounting.memory import RankLayout, TrainingShape, block_parameters
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


def block_gpu_seconds(
    cfg: ModelConfig, letter: str, shape: TrainingShape, layout: RankLayout, costs: GpuCosts
) -> float:
    """Forward + backward GPU time of one block's FLOPs for one micro-batch on one rank."""
    terms = block_flops(cfg, letter, shape.seq_len).terms
    seconds = 0.0
    for name, fwd in terms.items():
        passes = 3.0
        if shape.recompute == "full" or (shape.recompute == "selective" and name in ATTENTION_CORE):
            passes += 1.0
        flops = fwd * shape.micro_batch * passes / layout.tp
        seconds += flops / (costs.tflops[OP_CLASS[name]] * 1e12)
    return seconds


def block_host_seconds(cfg: ModelConfig, letter: str, shape: TrainingShape, costs: GpuCosts) -> float:
    """Forward + backward host (kernel launch) time of one block for one micro-batch."""
    branches = int(letter in (MAMBA, INTRA)) + int(letter in (*ATTENTION_LETTERS, INTRA))
    seconds = branches * costs.host_s_per_mixer
    if has_ffn(cfg, letter):
        seconds += costs.host_s_per_ffn
        if ffn_is_moe(cfg, letter):
            seconds += costs.host_s_per_moe
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


def block_comm_seconds(
    cfg: ModelConfig, letter: str, shape: TrainingShape, layout: RankLayout, costs: GpuCosts
) -> float:
    """TP and EP communication time of one block for one micro-batch on one rank."""
    h, tokens = cfg.hidden_size, shape.tokens
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
    return seconds


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
        head = 2 * cfg.hidden_size * cfg.vocab_size * shape.seq_len * shape.micro_batch * 3 / layout.tp
        seconds += head / (costs.tflops["gemm"] * 1e12)
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
        p2p = shape.tokens * cfg.hidden_size * 2 / _group_bandwidth(costs, layout.tp * layout.pp)
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
    if layout.dp > 1:
        volume = (4 + 2) * local * (layout.dp - 1) / layout.dp
        dp_s = (
            volume / _group_bandwidth(costs, layout.tp * layout.pp * layout.dp)
            + 2 * costs.collective_latency_s
        )
    optimizer_s = costs.optimizer_s_per_param * local / layout.dp + costs.step_overhead_s
    step = pipeline + dp_s + optimizer_s
    gpus = layout.tp * layout.pp * layout.dp
    tokens = shape.tokens * shape.microbatches * layout.dp
    tps = tokens / step
    mfu = model_flops_per_token(cfg, shape.seq_len) * tps / (gpus * costs.peak_tflops * 1e12)
    return StepTime(step, pipeline, dp_s, optimizer_s, per_stage, tps, tps / gpus, mfu)
