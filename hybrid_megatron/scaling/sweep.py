"""Compute-matched sweeps: kinds x token budgets, P- or F-matched, as a list of runs.

A sweep file (``recipes/sweeps/*.yaml``)::

    sweep:
      name: paper-1b-F            # becomes every run's tracking.compare_group
      match: F                    # P: same tokens for all; F: same training FLOPs as `reference`
      reference: transformer_1b   # (F) the run whose token budget sets the FLOP budget
      tokens: [102B]              # budgets (of the reference under F)
      recipes: [../transformer_1b.yaml, ../inter_1b.yaml, ...]
      overrides: [train.eval_interval=2000]   # applied to every run

Under ``F`` a kind's token budget is ``tokens * F_ref / F_kind`` with F the training
FLOPs per token from :mod:`hybrid_megatron.accounting` at the recipe's sequence length, so
every run spends the same compute (the paper's "F-matched" comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hybrid_megatron.accounting import count_parameters, model_flops_per_token
from hybrid_megatron.config import load_recipe
from hybrid_megatron.config.errors import RecipeError
from hybrid_megatron.config.train import parse_count


class SweepSpec(BaseModel):
    """The ``sweep:`` section of a sweep file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    match: Literal["P", "F"]
    recipes: list[str] = Field(min_length=1, description="recipe files, relative to this file")
    tokens: list[int] = Field(min_length=1, description="token budgets")
    reference: str | None = Field(default=None, description="F: recipe stem setting the budget")
    overrides: list[str] = Field(default_factory=list)

    @field_validator("tokens", mode="before")
    @classmethod
    def _parse_tokens(cls, values):
        return [parse_count(v) for v in values]


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its name, recipe, overrides and planned N, D, C."""

    name: str
    recipe_path: str
    overrides: tuple[str, ...]
    kind: str
    params: int
    tokens: int
    flops: float


def load_sweep(path: str | Path, extra_overrides: tuple[str, ...] = ()) -> tuple[SweepSpec, list[SweepRun]]:
    """Read a sweep file and expand it into runs.

    Takes the sweep YAML path and overrides applied to every run (after the sweep's own).
    Returns the spec and the runs, each with overrides that set its token budget, run name,
    checkpoint directory and the ``hm.compare_group`` / ``hm.match`` tags. Raises RecipeError
    naming the file and field for a bad sweep or recipe.
    """
    path = Path(path).resolve()
    try:
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict) or "sweep" not in raw:
            raise RecipeError(f"{path}: not a sweep file: it has no 'sweep:' section")
        spec = SweepSpec(**raw["sweep"])
    except (OSError, yaml.YAMLError) as err:
        raise RecipeError(f"{path}: cannot read sweep file ({err})") from None
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"{path}: sweep.{loc}: {first['msg']}") from None

    bases = []
    for rel in spec.recipes:
        recipe_path = (path.parent / rel).resolve()
        recipe = load_recipe(recipe_path, [*spec.overrides, *extra_overrides])
        per_token = model_flops_per_token(recipe.model, recipe.data.seq_length)
        bases.append((recipe_path, recipe, per_token))
    stems = [p.stem for p, _, _ in bases]
    if spec.match == "F":
        if spec.reference not in stems:
            raise RecipeError(f"{path}: sweep.reference: {spec.reference!r} is not one of {stems}")
        ref_per_token = bases[stems.index(spec.reference)][2]

    runs = []
    for budget in spec.tokens:
        for recipe_path, recipe, per_token in bases:
            tokens = budget if spec.match == "P" else round(budget * ref_per_token / per_token)
            name = f"{spec.name}-{recipe_path.stem}-{_short(budget)}"
            # beside the base recipe's own runs: <runs>/<sweep name>/<run name>/checkpoints
            run_dir = Path(recipe.run_dir).parent / spec.name / name
            overrides = (
                *spec.overrides,
                *extra_overrides,
                "train.steps=null",
                f"train.tokens={tokens}",
                f"name={name}",
                f"checkpoint.dir={run_dir / 'checkpoints'}",
                f"tracking.compare_group={spec.name}",
                f"tracking.match={spec.match}",
            )
            runs.append(
                SweepRun(
                    name=name,
                    recipe_path=str(recipe_path),
                    overrides=overrides,
                    kind=recipe.model.kind,
                    params=count_parameters(recipe.model).total,
                    tokens=tokens,
                    flops=per_token * tokens,
                )
            )
    return spec, runs


def _short(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return str(int(n))


def format_sweep_table(spec: SweepSpec, runs: list[SweepRun]) -> str:
    """A fixed-width table of the runs (name, kind, N, D, C) for ``--dry-run``."""
    lines = [
        f"sweep {spec.name}: {len(runs)} runs, {spec.match}-matched",
        f"{'run':<44} {'kind':<12} {'N (params)':>12} {'D (tokens)':>14} {'C (FLOPs)':>12}",
    ]
    for r in runs:
        lines.append(f"{r.name:<44} {r.kind:<12} {r.params:>12,} {r.tokens:>14,} {r.flops:>12.3e}")
    return "\n".join(lines)


def next_steps(spec: SweepSpec, runs: list[SweepRun], stores: list[tuple[str, str]], out_dir: str) -> str:
    """What to run once the sweep's runs have finished, every value filled in.

    Takes the spec, its runs, the distinct (tracking URI, experiment) pairs its runs log to and
    the directory for the analyses (the sweep's run folder). Returns lines: ``compare``, ``fit``
    when every kind has enough runs for a law (else why not), and ``mlflow ui``.
    """
    from hybrid_megatron.scaling.commands import mlflow_ui_command, scaling_command
    from hybrid_megatron.scaling.runs import MIN_RUNS

    per_kind: dict[str, int] = {}
    for run in runs:
        per_kind[run.kind] = per_kind.get(run.kind, 0) + 1
    lines = ["next steps:"]
    for uri, experiment in stores:
        lines += [
            "  # the table of final losses per budget and kind, and loss_vs_flops.png",
            "  " + scaling_command("compare", uri, experiment, spec.name, f"{out_dir}/compare"),
        ]
        if min(per_kind.values()) >= MIN_RUNS:
            lines += [
                "  # scaling-law fits per kind (fit.json, loss_vs_compute.png, isoflop.png)",
                "  " + scaling_command("fit", uri, experiment, spec.name, f"{out_dir}/fit"),
            ]
        else:
            lines.append(
                f"  # (no fit: a scaling law needs at least {MIN_RUNS} runs per kind, this "
                f"sweep has {min(per_kind.values())}; add budgets or model sizes to fit one)"
            )
        lines += ["  # browse the runs", "  " + mlflow_ui_command(uri)]
    return "\n".join(lines)
