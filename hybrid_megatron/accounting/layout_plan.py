"""Will it fit, and how fast: every parallel layout of a recipe on N GPUs, priced.

For each layout (``config.layout_search.candidate_layouts``: TP x CP x PP x EP) the planner
cuts the pipeline stages (explicit, even, or ``pp_split: balanced``), predicts each stage's
peak memory (``accounting.memory``) and the step time (``accounting.step_time``), and ranks the
layouts: those that fit first, then by tokens/s. Per layout it searches the micro-batch size
(1, 2, 4, ... while the global batch splits into them over the data-parallel ranks and the
layout fits) and the recompute mode (none, selective, full), and keeps the fastest that fits;
the recipe's own layout, micro-batch and recompute are priced as well and marked. The
sequence length, global batch, precision and Adam moments are the recipe's; the gradient
accumulation follows from the data-parallel size and the micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybrid_megatron.accounting.memory import (
    GIB,
    RECOMPUTE_MODES,
    MemoryEstimate,
    RankLayout,
    TrainingShape,
    stage_memory,
)
from hybrid_megatron.accounting.step_time import (
    GpuCosts,
    StepTime,
    block_comm_seconds,
    block_compute_seconds,
    head_seconds,
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
    """One layout's prediction: the layout with its stages resolved, the training shape it was
    priced at, per-stage memory and step time; ``recipe`` marks the recipe's own configuration."""

    parallel: ParallelConfig
    stages: list[str]
    memory: list[MemoryEstimate]
    time: StepTime
    memory_limit_gib: float
    shape: TrainingShape
    recipe: bool = False

    @property
    def peak(self) -> MemoryEstimate:
        """The stage with the largest predicted peak (every rank must fit)."""
        return max(self.memory, key=lambda m: m.total)

    @property
    def fits(self) -> bool:
        """Whether every stage's predicted peak is within the GPU's memory."""
        return self.peak.total_gib <= self.memory_limit_gib

    def name(self) -> str:
        """``tp2 cp1 pp2 ep1`` (+ ``etp1`` for whole experts under TP)."""
        p = self.parallel
        text = f"tp{p.tp} cp{p.cp} pp{p.pp} ep{p.ep}"
        if p.expert_tp is not None and p.expert_tp != p.tp:
            text += f" etp{p.expert_tp}"
        return text

    def key(self) -> tuple:
        """What makes two predictions the same configuration: layout, stages, micro-batch, recompute."""
        p = self.parallel
        stages = tuple(len(s) for s in self.stages)
        return (self.name(), p.cp_comm, p.mamba_cp, stages, self.shape.micro_batch, self.shape.recompute)


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


def training_shape(
    recipe: Any,
    parallel: ParallelConfig,
    gpus: int,
    micro_batch: int | None = None,
    recompute: str | None = None,
) -> tuple[RankLayout, TrainingShape]:
    """The rank layout and training shape of ``recipe`` at ``parallel`` on ``gpus`` ranks, with
    ``micro_batch`` and ``recompute`` (default the recipe's).

    Raises LayoutError when the model ranks (tp x cp x pp) do not divide the GPUs or the global
    batch does not split into micro-batches over the data-parallel ranks.
    """
    model_ranks = parallel.tp * parallel.cp * parallel.pp
    if gpus % model_ranks:
        raise LayoutError(
            f"parallel: tp {parallel.tp} x cp {parallel.cp} x pp {parallel.pp} does not divide {gpus} GPUs"
        )
    dp = gpus // model_ranks
    train = recipe.train
    micro_batch = micro_batch or train.micro_batch_size
    per_step = micro_batch * dp
    if train.global_batch_size % per_step:
        raise LayoutError(
            f"train.global_batch_size: {train.global_batch_size} is not a multiple of micro-batch "
            f"{micro_batch} x dp {dp} on {gpus} GPUs"
        )
    layout = RankLayout(
        tp=parallel.tp,
        pp=parallel.pp,
        ep=parallel.ep,
        expert_tp=parallel.expert_tensor_parallel,
        dp=dp,
        sequence_parallel=parallel.sequence_parallel,
        cp=parallel.cp,
        cp_comm=parallel.cp_comm,
        mamba_cp=parallel.mamba_cp,
    )
    shape = TrainingShape(
        seq_len=recipe.data.seq_length,
        micro_batch=micro_batch,
        microbatches=train.global_batch_size // per_step,
        precision=train.precision,
        recompute=recompute or train.recompute,
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


def predict_layout(
    recipe: Any,
    parallel: ParallelConfig,
    target: Target,
    micro_batch: int | None = None,
    recompute: str | None = None,
) -> LayoutPrediction:
    """Memory and step-time prediction of ``recipe`` at ``parallel`` on the target's GPUs, with
    ``micro_batch`` and ``recompute`` (default the recipe's)."""
    cfg = recipe.model
    layout, shape = training_shape(recipe, parallel, target.gpus, micro_batch, recompute)
    stages = resolve_stages(cfg, parallel, layout, shape, target.costs, target.memory_gib)
    memory = [stage_memory(cfg, s, i, layout, shape) for i, s in enumerate(stages)]
    time = predict_step(cfg, stages, layout, shape, target.costs)
    resolved = parallel
    if parallel.pp_split == "balanced":
        resolved = parallel.model_copy(update={"pipeline_stage_layers": [len(s) for s in stages]})
    return LayoutPrediction(resolved, stages, memory, time, target.memory_gib, shape)


def _rank(p: LayoutPrediction) -> tuple:
    """Sort key: fitting first, then fastest; among equals, less recompute and less memory."""
    return (not p.fits, -p.time.tokens_per_s, RECOMPUTE_MODES.index(p.shape.recompute), p.peak.total)


def best_training_shape(recipe: Any, parallel: ParallelConfig, target: Target) -> LayoutPrediction:
    """The fastest fitting micro-batch size and recompute mode of ``recipe`` at ``parallel``
    (the one needing least memory when none fits): micro-batches 1, 2, 4, ... while the global
    batch splits into them over the data-parallel ranks, in each recompute mode until one no
    longer fits. Raises LayoutError when not even one sample per micro-batch splits the batch."""
    found: list[LayoutPrediction] = []
    for recompute in RECOMPUTE_MODES:
        micro_batch = 1
        while True:
            try:
                p = predict_layout(recipe, parallel, target, micro_batch, recompute)
            except LayoutError:
                break
            found.append(p)
            if not p.fits:
                break
            micro_batch *= 2
    if not found:
        raise LayoutError(
            f"train.global_batch_size: {recipe.train.global_batch_size} does not split over the "
            f"data-parallel ranks of layout tp {parallel.tp} x cp {parallel.cp} x pp {parallel.pp} "
            f"on {target.gpus} GPUs"
        )
    fitting = [p for p in found if p.fits]
    if fitting:
        return min(fitting, key=_rank)
    return min(found, key=lambda p: p.peak.total)


def plan_layouts(recipe: Any, target: Target, search_shape: bool = True) -> list[LayoutPrediction]:
    """Every valid layout of the recipe on the target's GPUs, predicted; those that fit first,
    then fastest first. With ``search_shape`` each layout gets its best micro-batch size and
    recompute mode (``best_training_shape``), else the recipe's. The recipe's own configuration
    is in the list with ``recipe`` set (added when no other row equals it), unless its layout
    does not divide the target's GPUs or the global batch."""
    out = []
    for parallel in candidate_layouts(recipe.model, target.gpus, recipe.parallel, recipe.data.seq_length):
        try:
            if search_shape:
                out.append(best_training_shape(recipe, parallel, target))
            else:
                out.append(predict_layout(recipe, parallel, target))
        except LayoutError:
            continue
    try:
        own: LayoutPrediction | None = predict_layout(recipe, recipe.parallel, target)
    except InputError:
        own = None
    if own is not None:
        same = [p for p in out if p.key() == own.key()]
        if same:
            same[0].recipe = True
        else:
            own.recipe = True
            out.append(own)
    out.sort(key=_rank)
    return out


PART_ORDER = (
    "weights",
    "fp8_weights",
    "gradients",
    "optimizer",
    "optimizer_step",
    "activations",
    "moe_dispatch",
    "cp_buffers",
    "logits",
    "overhead",
)
RECIPE_MARK = "<- recipe"


def render_plan(predictions: list[LayoutPrediction], target: Target, title: str = "") -> str:
    """The plan as a text table, one layout a row (the best first; the recipe's own marked)."""
    head = (
        f"{'layout':<20} {'dp':>3} {'mbs':>3} {'recomp':<9} {'stages':<15} {'mem GiB':>8} "
        f"{'weights':>7} {'grads':>6} {'optim':>6} {'activ':>6} {'moe':>5} {'logits':>6} {'step s':>7} "
        f"{'tok/s':>9} {'tok/s/gpu':>9} {'MFU':>5}  fits"
    )
    lines = []
    if title:
        lines.append(title)
    lines.append(
        f"# {target.gpus} GPUs of {target.memory_gib:g} GiB, cost table {target.costs.name} "
        f"(accounting/gpu_costs/{target.costs.name}.yaml); memory: the fullest stage; mbs, recomp: "
        f"the fastest micro-batch and recompute mode that fit; {RECIPE_MARK}: the recipe's own"
    )
    lines += [head, "-" * len(head)]
    for p in predictions:
        g = p.peak.gib()
        stages = "/".join(str(len(s)) for s in p.stages)
        dp = target.gpus // (p.parallel.tp * p.parallel.cp * p.parallel.pp)
        mark = f"  {RECIPE_MARK}" if p.recipe else ""
        lines.append(
            f"{p.name():<20} {dp:>3} {p.shape.micro_batch:>3} {p.shape.recompute:<9} {stages:<15} "
            f"{p.peak.total_gib:>8.1f} {g['weights'] + g.get('fp8_weights', 0.0):>7.1f} "
            f"{g['gradients']:>6.1f} {g['optimizer'] + g.get('optimizer_step', 0.0):>6.1f} "
            f"{g.get('activations', 0.0) + g.get('cp_buffers', 0.0):>6.1f} "
            f"{g.get('moe_dispatch', 0.0):>5.1f} {g.get('logits', 0.0):>6.1f} {p.time.step_s:>7.3f} "
            f"{p.time.tokens_per_s:>9,.0f} {p.time.tokens_per_s_per_gpu:>9,.0f} {p.time.mfu:>5.1%}  "
            f"{'yes' if p.fits else 'NO'}{mark}"
        )
    if not predictions:
        lines.append("(no layout of this model divides these GPUs and the global batch)")
    return "\n".join(lines)


def render_prediction(p: LayoutPrediction) -> str:
    """One layout's prediction: per-stage memory by part, step time, tokens/s and MFU."""
    lines = [
        f"layout {p.name()}, micro-batch {p.shape.micro_batch} x {p.shape.microbatches}, recompute "
        f"{p.shape.recompute}, stages {[len(s) for s in p.stages]} (blocks {' | '.join(p.stages)})"
    ]
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
