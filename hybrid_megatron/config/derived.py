"""Quantities that follow from a recipe and a world size: dp, gradient accumulation, budget.

``derived(recipe, world_size, param_counter)`` is computed by the launcher (before submitting)
and by the trainer (at start); `format_derived` is the block both print. The parameter counter
is passed in (they pass ``hybrid_megatron.accounting.count_parameters``) because the accounting sits
above the recipe: config never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from hybrid_megatron.config.errors import RecipeError
from hybrid_megatron.config.layer_pattern import build_layer_pattern


def data_parallel_size(par, world_size: int) -> int:
    """The data-parallel size of ``world_size`` ranks under ParallelConfig ``par``.

    Raises RecipeError naming ``parallel`` when tp*cp*pp does not divide the world or an expert
    group (ep x expert tp ranks) does not divide dp*cp*tp (megatron-core carves the expert groups
    out of each pipeline stage's dp*cp*tp ranks).
    """
    model_ranks = par.tp * par.cp * par.pp
    if world_size % model_ranks:
        raise RecipeError(
            f"parallel: world size {world_size} is not divisible by tp*cp*pp = "
            f"{par.tp}*{par.cp}*{par.pp} = {model_ranks}"
        )
    dp = world_size // model_ranks
    etp = par.expert_tensor_parallel
    dense = dp * par.cp * par.tp
    if dense % par.expert_group_size:
        if etp == 1:
            raise RecipeError(
                f"parallel.ep: {par.ep} does not divide dp*cp*tp = {dp}*{par.cp}*{par.tp} on "
                f"{world_size} ranks"
            )
        raise RecipeError(
            f"parallel.ep: ep {par.ep} x expert tp {etp} = {par.expert_group_size} ranks per expert "
            f"group do not divide dp*cp*tp = {dp}*{par.cp}*{par.tp} on {world_size} ranks (the "
            f"experts' TP defaults to parallel.tp; parallel.expert_tp=1 spreads whole experts over "
            f"the TP ranks instead)"
        )
    return dp


def derived(recipe, world_size: int, param_counter: Callable[[Any], Any] | None = None) -> dict:
    """Compute what the recipe implies on ``world_size`` ranks.

    Takes a Recipe, the number of ranks, and optionally a parameter counter
    (``f(model_config)`` returning a report whose ``headline()`` is the dict of counts, such as
    ``accounting.count_parameters``, or None). Returns a
    dict with world_size, tp, cp, pp, ep, dp, micro_batch_size, global_batch_size,
    grad_accum_steps, seq_length, tokens_per_step, total_steps, total_tokens, warmup_steps,
    layer_pattern and params (None without a counter). Raises RecipeError naming
    ``parallel`` or ``train.global_batch_size`` when the numbers do not divide.
    """
    par, train = recipe.parallel, recipe.train
    if world_size < 1:
        raise RecipeError(f"world size must be >= 1, got {world_size}")
    dp = data_parallel_size(par, world_size)
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise RecipeError(
            f"train.global_batch_size: {train.global_batch_size} is not divisible by "
            f"train.micro_batch_size * dp = {train.micro_batch_size} * {dp} = {per_step} "
            f"(world size {world_size})"
        )
    seq = recipe.data.seq_length
    tokens_per_step = train.global_batch_size * seq
    if train.steps is not None:
        total_steps = train.steps
    else:
        total_steps = math.ceil(train.tokens / tokens_per_step)
    if train.warmup_steps >= total_steps:
        raise RecipeError(
            f"train.warmup_steps: {train.warmup_steps} must be smaller than the {total_steps} total steps"
        )
    report = param_counter(recipe.model) if param_counter is not None else None
    params = report.headline() if report is not None else None
    return {
        "world_size": world_size,
        "tp": par.tp,
        "cp": par.cp,
        "pp": par.pp,
        "ep": par.ep,
        "expert_tp": par.expert_tensor_parallel,
        "dp": dp,
        "micro_batch_size": train.micro_batch_size,
        "global_batch_size": train.global_batch_size,
        "grad_accum_steps": train.global_batch_size // per_step,
        "seq_length": seq,
        "tokens_per_step": tokens_per_step,
        "total_steps": total_steps,
        "total_tokens": total_steps * tokens_per_step,
        "warmup_steps": train.warmup_steps,
        "layer_pattern": build_layer_pattern(recipe.model),
        "params": params,
    }


def human(n: float | None) -> str:
    """A count in K/M/B/T with 3 significant digits (``1.02B``); ``n/a`` for None."""
    if n is None:
        return "n/a"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _sequence_row(values: dict) -> str:
    cp = values.get("cp", 1)
    split = f" ({values['seq_length'] // cp} per rank over cp {cp})" if cp > 1 else ""
    return f"{values['seq_length']} tokens{split}; {values['tokens_per_step']:,} tokens/step"


def format_derived(values: dict) -> str:
    """The derived quantities as an aligned text block for logs (takes `derived`'s dict)."""
    params = values.get("params")
    if isinstance(params, dict):
        params_text = ", ".join(f"{k} {human(v)}" for k, v in params.items())
    else:
        params_text = human(params)
    rows = [
        (
            "ranks",
            f"{values['world_size']} = tp {values['tp']}"
            + (f" x cp {values['cp']}" if values.get("cp", 1) > 1 else "")
            + f" x pp {values['pp']} x dp {values['dp']}"
            + f" (ep {values['ep']}, expert tp {values['expert_tp']})",
        ),
        (
            "batch",
            f"global {values['global_batch_size']} = micro {values['micro_batch_size']} x dp "
            f"{values['dp']} x grad accumulation {values['grad_accum_steps']}",
        ),
        ("sequence", _sequence_row(values)),
        (
            "budget",
            f"{values['total_steps']:,} steps, {values['total_tokens']:,} tokens "
            f"({human(values['total_tokens'])}); warmup {values['warmup_steps']} steps",
        ),
        ("layers", values.get("layer_pattern") or "n/a"),
        ("params", params_text),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
