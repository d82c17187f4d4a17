"""Will it fit, and how fast: every parallel layout of a recipe on N GPUs, priced.

For each layout (``config.layout_search.candidate_layouts``) the planner cuts the pipeline
stages (explicit, even, or ``pp_split: balanced``), predicts each stage's peak memory
(``accounting.memory``) and the step time (``accounting.step_time``), and ranks the layouts:
those that fit first, then by tokens/s. The recipe's training shape (sequence length,
micro-batch, global batch, recompute, precision, Adam moments) is kept; the gradient
accumulation follows from the data-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybrid_megatron.accounting.memory import GIB, MemoryEstimate, RankLayout, TrainingShape, stage_memory
from hybrid_megatron.accounting.step_time import (
    GpuCosts,
    StepTime,
    block_comm_seconds,
    block_compute_seconds,
    load_costs,
    predict_step,
)
from hybrid_megatron.config.layer_pattern import build_layer_pattern, split_pattern
from hybrid_megatron.config.layout_search import balanced_stage_layers, candidate_layouts
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.errors import InputError

DEFAULT_GPU_MEMORY_GIB = 80.0
_GPU_NAMES = ("h200", "h100")  # GPU types with a cost table, looked for in the slurm section


class LayoutError(InputError, ValueError):
    """A layout that does not fit the recipe's batch or the GPUs; the message names the field."""


@dataclass(frozen=True)
class Target:
    """The GPUs a plan is for: how many, their memory (GiB) and their cost table."""

    gpus: int
    memory_gib: float
    costs: GpuCosts


@dataclass
class LayoutPrediction:
    """One layout's prediction: the layout with its stages resolved, per-stage memory, step time."""

    parallel: ParallelConfig
    stages: list[str]
    memory: list[MemoryEstimate]
    time: StepTime
    memory_limit_gib: float

    @property
    def peak(self) -> MemoryEstimate:
        """The stage with the largest predicted peak (every rank must fit)."""
        return max(self.memory, key=lambda m: m.total)

    @property
    def fits(self) -> bool:
        """Whether every stage's predicted peak is within the GPU's memory."""
        return self.peak.total_gib <= self.memory_limit_gib

    def name(self) -> str:
        """``tp2 pp2 ep1 dp2`` (+ ``etp1`` for whole experts under TP)."""
        p = self.parallel
        text = f"tp{p.tp} pp{p.pp} ep{p.ep}"
        if p.expert_tp is not None and p.expert_tp != p.tp:
            text += f" etp{p.expert_tp}"
        return text


def gpu_type(recipe: Any) -> str | None:
    """The GPU type the recipe's ``slurm`` section names (constraint, partition, gres), if one
    with a cost table; else None."""
    s = recipe.slurm
    text = " ".join(str(v) for v in (s.constraint, s.partition, *s.sbatch_extra.values()) if v).lower()
    return next((name for name in _GPU_NAMES if name in text), None)


def target_for(recipe: Any, gpus: int | None = None, memory_gib: float | None = None) -> Target:
    """The plan's GPUs: ``gpus`` (default the recipe's world size), ``memory_gib`` (default the
    recipe's GPU type's memory, else 80 GiB) and the cost table (the recipe's GPU type, else H100)."""
    name = gpu_type(recipe)
    costs = load_costs(name or "h100")
    if memory_gib is None:
        memory_gib = costs.memory_gib if name else DEFAULT_GPU_MEMORY_GIB
    return Target(gpus or recipe.slurm.world_size, memory_gib, costs)


def training_shape(recipe: Any, parallel: ParallelConfig, gpus: int) -> tuple[RankLayout, TrainingShape]:
    """The rank layout and training shape of ``recipe`` at ``parallel`` on ``gpus`` ranks.

    Raises LayoutError when the model ranks do not divide the GPUs or the global batch does not
    split into micro-batches over the data-parallel ranks.
    """
    model_ranks = parallel.tp * parallel.pp
    if gpus % model_ranks:
        raise LayoutError(f"parallel: tp {parallel.tp} x pp {parallel.pp} does not divide {gpus} GPUs")
    dp = gpus // model_ranks
    train = recipe.train
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise LayoutError(
            f"train.global_batch_size: {train.global_batch_size} is not a multiple of micro-batch "
            f"{train.micro_batch_size} x dp {dp} on {gpus} GPUs"
        )
    layout = RankLayout(
        tp=parallel.tp,
        pp=parallel.pp,
        ep=parallel.ep,
        expert_tp=parallel.expert_tensor_parallel,
        dp=dp,
        sequence_parallel=parallel.sequence_parallel,
    )
    shape = TrainingShape(
        seq_len=recipe.data.seq_length,
        micro_batch=train.micro_batch_size,
        microbatches=train.global_batch_size // per_step,
        precision=train.precision,
        recompute=train.recompute,
        adam_moments=train.adam_moments,
    )
    return layout, shape


def block_seconds(
    cfg: ModelConfig, pattern: str, layout: RankLayout, shape: TrainingShape, costs: GpuCosts
) -> list[float]:
    """Predicted forward + backward seconds of each block of ``pattern`` for one micro-batch."""
    return [
        block_compute_seconds(cfg, c, shape, layout, costs) + block_comm_seconds(cfg, c, shape, layout, costs)
        for c in pattern
    ]


def head_seconds(cfg: ModelConfig, layout: RankLayout, shape: TrainingShape, costs: GpuCosts) -> float:
    """Predicted forward + backward seconds of the LM head for one micro-batch (last stage)."""
    flops = 2 * cfg.hidden_size * cfg.vocab_size * shape.tokens * 3 / layout.tp
    return flops / (costs.tflops["gemm"] * 1e12)


def resolve_stages(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    layout: RankLayout,
    shape: TrainingShape,
    costs: GpuCosts,
    memory_gib: float | None = None,
) -> list[str]:
    """The block pattern of each pipeline stage: the explicit or even split, or for
    ``pp_split: balanced`` the split that minimises the slowest stage's predicted time among
    those whose stages fit ``memory_gib`` (all splits when none fits, or no limit is given)."""
    pattern = build_layer_pattern(cfg)
    if parallel.pp_split != "balanced" or parallel.pipeline_stage_layers is not None:
        return split_pattern(pattern, parallel.pp, parallel.pipeline_stage_layers)
    costs_per_block = block_seconds(cfg, pattern, layout, shape, costs)
    last = head_seconds(cfg, layout, shape, costs)

    def fits(stage: int, start: int, end: int) -> bool:
        assert memory_gib is not None
        return stage_memory(cfg, pattern[start:end], stage, layout, shape).total_gib <= memory_gib

    layers = None
    if memory_gib is not None:
        layers = balanced_stage_layers(costs_per_block, parallel.pp, 0.0, last, fits)
    if layers is None:
        layers = balanced_stage_layers(costs_per_block, parallel.pp, 0.0, last)
    if layers is None:
        raise LayoutError(f"parallel.pp: {parallel.pp} stages for {len(pattern)} blocks")
    return split_pattern(pattern, parallel.pp, layers)


def predict_layout(recipe: Any, parallel: ParallelConfig, target: Target) -> LayoutPrediction:
    """Memory and step-time prediction of ``recipe`` at ``parallel`` on the target's GPUs."""
    cfg = recipe.model
    layout, shape = training_shape(recipe, parallel, target.gpus)
    stages = resolve_stages(cfg, parallel, layout, shape, target.costs, target.memory_gib)
    memory = [stage_memory(cfg, s, i, layout, shape) for i, s in enumerate(stages)]
    time = predict_step(cfg, stages, layout, shape, target.costs)
    resolved = parallel
    if parallel.pp_split == "balanced":
        resolved = parallel.model_copy(update={"pipeline_stage_layers": [len(s) for s in stages]})
    return LayoutPrediction(resolved, stages, memory, time, target.memory_gib)


def plan_layouts(recipe: Any, target: Target) -> list[LayoutPrediction]:
    """Every valid layout of the recipe on the target's GPUs, predicted; those that fit first,
    then fastest first."""
    out = []
    for parallel in candidate_layouts(recipe.model, target.gpus, recipe.parallel):
        try:
            out.append(predict_layout(recipe, parallel, target))
        except LayoutError:
            continue
    out.sort(key=lambda p: (not p.fits, -p.time.tokens_per_s))
    return out


PART_ORDER = ("weights", "gradients", "optimizer", "activations", "moe_dispatch", "logits", "overhead")


def render_plan(predictions: list[LayoutPrediction], target: Target, title: str = "") -> str:
    """The plan as a text table, one layout a row (the best first)."""
    head = (
        f"{'layout':<18} {'dp':>3} {'stages':<12} {'mem GiB':>8} {'weights':>7} {'grads':>6} "
        f"{'optim':>6} {'activ':>6} {'moe':>5} {'logits':>6} {'step s':>7} {'tok/s':>9} "
        f"{'tok/s/gpu':>9} {'MFU':>5}  fits"
    )
    lines = []
    if title:
        lines.append(title)
    lines.append(
        f"# {target.gpus} GPUs of {target.memory_gib:g} GiB, cost table {target.costs.name} "
        f"(accounting/gpu_costs/{target.costs.name}.yaml); memory: the fullest stage"
    )
    lines += [head, "-" * len(head)]
    for p in predictions:
        g = p.peak.gib()
        stages = "/".join(str(len(s)) for s in p.stages)
        lines.append(
            f"{p.name():<18} {target.gpus // (p.parallel.tp * p.parallel.pp):>3} {stages:<12} "
            f"{p.peak.total_gib:>8.1f} {g['weights']:>7.1f} {g['gradients']:>6.1f} {g['optimizer']:>6.1f} "
            f"{g['activations']:>6.1f} {g['moe_dispatch']:>5.1f} {g['logits']:>6.1f} {p.time.step_s:>7.3f} "
            f"{p.time.tokens_per_s:>9,.0f} {p.time.tokens_per_s_per_gpu:>9,.0f} {p.time.mfu:>5.1%}  "
            f"{'yes' if p.fits else 'NO'}"
        )
    if not predictions:
        lines.append("(no layout of this model divides these GPUs and the global batch)")
    return "\n".join(lines)


def render_prediction(p: LayoutPrediction) -> str:
    """One layout's prediction: per-stage memory by part, step time, tokens/s and MFU."""
    lines = [f"layout {p.name()}, stages {[len(s) for s in p.stages]} (blocks {' | '.join(p.stages)})"]
    for i, m in enumerate(p.memory):
        parts = ", ".join(f"{k} {m.gib()[k]:.1f}" for k in PART_ORDER if m.parts.get(k))
        lines.append(f"stage {i}: {m.total_gib:.1f} GiB of {p.memory_limit_gib:g} ({parts})")
    t = p.time
    lines.append(
        f"step {t.step_s:.3f} s (pipeline {t.pipeline_s:.3f}, data-parallel {t.dp_s:.3f}, optimizer "
        f"{t.optimizer_s:.3f}); {t.tokens_per_s:,.0f} tokens/s, {t.tokens_per_s_per_gpu:,.0f} per GPU, "
        f"MFU {t.mfu:.1%}"
    )
    return "\n".join(lines)


def check_fits(p: LayoutPrediction) -> None:
    """Raise LayoutError naming the predicted memory and its largest part unless the layout fits."""
    if p.fits:
        return
    stage = max(range(len(p.memory)), key=lambda i: p.memory[i].total)
    name, size = p.memory[stage].largest
    raise LayoutError(
        f"parallel: layout {p.name()} does not fit: stage {stage} is predicted to need "
        f"{p.memory[stage].total_gib:.1f} GiB per GPU of {p.memory_limit_gib:g} GiB; the largest "
        f"part is {name} ({size / GIB:.1f} GiB). Try --plan for the layouts that fit"
    )
