"""The parallel layouts a model can take on N GPUs, and cost-balanced pipeline stage boundaries.

Pure arithmetic (no megatron-core, no torch): the planner (``accounting.layout_plan``) prices the
layouts listed here, and ``parallel.pp_split: balanced`` cuts the stack with
:func:`balanced_stage_layers` from per-block costs the accounting computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from hybrid_megatron.config.errors import ModelConfigError
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.config.parallel_layout import check_parallel_layout, check_sequence_split
from hybrid_megatron.errors import InputError

# fits(stage, first_block, end_block) -> whether blocks [first_block, end_block) fit on stage
StageFits = Callable[[int, int, int], bool]


def stage_costs(
    costs: Sequence[float], stage_layers: Sequence[int], first_extra: float = 0.0, last_extra: float = 0.0
) -> list[float]:
    """Cost of each stage: its blocks' costs, plus ``first_extra`` (the embedding) on the first
    and ``last_extra`` (final norm, LM head, loss) on the last stage."""
    out, start = [], 0
    for i, count in enumerate(stage_layers):
        cost = sum(costs[start : start + count])
        cost += first_extra if i == 0 else 0.0
        cost += last_extra if i == len(stage_layers) - 1 else 0.0
        out.append(cost)
        start += count
    return out


def balanced_stage_layers(
    costs: Sequence[float],
    pp: int,
    first_extra: float = 0.0,
    last_extra: float = 0.0,
    fits: StageFits | None = None,
) -> list[int] | None:
    """Blocks per stage that minimise the slowest stage's cost, every stage non-empty and
    fitting (``fits``); None when no split fits.

    Takes each block's cost in stack order, the number of stages and the extra cost of the
    first and last stage. Dynamic programming over (stages used, blocks placed), O(pp * n^2);
    among equally slow splits it returns the one whose earlier stages hold the most blocks.
    """
    n = len(costs)
    if pp < 1 or pp > n:
        return None
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")

    def cost(stage: int, start: int, end: int) -> float:
        if fits is not None and not fits(stage, start, end):
            return inf
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == pp - 1 else 0.0)
        return prefix[end] - prefix[start] + extra

    # best[s][j]: the smallest max-cost of putting blocks [0, j) on stages 0..s-1
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for s in range(1, pp + 1):
        for j in range(s, n - (pp - s) + 1):
            for i in range(j - 1, s - 2, -1):  # the last stage holds [i, j); prefer longer earlier stages
                if best[s - 1][i] == inf:
                    continue
                value = max(best[s - 1][i], cost(s - 1, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    if best[pp][n] == inf:
        return None
    bounds, j = [], n
    for s in range(pp, 0, -1):
        i = cut[s][j]
        bounds.append(j - i)
        j = i
    return bounds[::-1]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(
    cfg: ModelConfig, gpus: int, base: ParallelConfig | None = None, seq_length: int | None = None
) -> Iterator[ParallelConfig]:
    """Every TP x CP x PP x EP (x expert TP) layout of ``cfg`` on ``gpus`` ranks that the model
    can shard (``check_parallel_layout``), data parallel over the rest.

    Context parallel sizes above 1 are listed only with a ``seq_length`` that splits into their
    2 x cp chunks (``check_sequence_split``), with ``base``'s ``cp_comm`` and ``mamba_cp`` and
    the caps those impose (a2a and heads mode split heads over tp x cp). Sequence parallelism
    is on whenever tp > 1 (MoE needs it; it only saves memory otherwise); pipelines split their
    stages with ``pp_split: balanced``; experts are split like the dense layers (expert_tp =
    tp) or whole (expert_tp = 1), in groups carved from each stage's tp x cp x dp ranks. Other
    fields come from ``base``.
    """
    base = base or ParallelConfig()
    moe = cfg.moe is not None
    for tp, cp, pp, dp in _rank_grids(gpus, with_cp=seq_length is not None):
        for expert_tp, ep in _expert_splits(tp, dp * cp * tp, moe):
            try:
                parallel = base.model_copy(
                    update=dict(
                        tp=tp,
                        cp=cp,
                        pp=pp,
                        ep=ep,
                        expert_tp=expert_tp if moe and expert_tp != tp else None,
                        sequence_parallel=tp > 1,
                        pipeline_stage_layers=None,
                        pp_split="balanced" if pp > 1 else "even",
                    )
                )
                check_parallel_layout(cfg, parallel, tp, ep, cp)
                if seq_length is not None:
                    check_sequence_split(seq_length, parallel)
            except (ModelConfigError, InputError):
                continue
            yield parallel


def _rank_grids(gpus: int, with_cp: bool) -> Iterator[tuple[int, int, int, int]]:
    """(tp, cp, pp, dp) with tp x cp x pp x dp = ``gpus``; cp 1 only unless ``with_cp``."""
    for tp in _divisors(gpus):
        for cp in _divisors(gpus // tp) if with_cp else [1]:
            for pp in _divisors(gpus // (tp * cp)):
                yield tp, cp, pp, gpus // (tp * cp * pp)


def _expert_splits(tp: int, ranks: int, moe: bool) -> Iterator[tuple[int | None, int]]:
    """(expert_tp, ep) of the experts over a stage's ``ranks`` (tp x cp x dp): experts split
    like the dense layers (expert_tp = tp) or whole (1), in EP groups that divide the ranks;
    (None, 1) for a dense model."""
    if not moe:
        yield None, 1
        return
    for expert_tp in sorted({tp, 1}):
        for ep in _divisors(ranks):
            if ranks % (ep * expert_tp) == 0:
                yield expert_tp, ep
