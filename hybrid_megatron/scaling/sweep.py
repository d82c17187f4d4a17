"""Compute-matched sweeps: kinds x model sizes x budgets, P- or F-matched, as a list of runs.

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

An isoFLOP study varies model size within each kind and gives its budgets as compute::

      sizes:                      # label -> overrides; every recipe runs at every size
        s: [model.hidden_size=256, model.ffn_hidden_size=1024]
        m: [model.hidden_size=384, model.ffn_hidden_size=1536]
      flops: [1e16, 3e16]         # (F, instead of tokens) each run's tokens = C / F_run

With ``sizes`` a ``reference`` names ``stem@label``. Runs are budgets x recipes x sizes, named
``{name}-{stem}[-{label}]-{budget}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from hybrid_megatron.accounting import count_parameters, model_flops_per_token
from hybrid_megatron.config import load_recipe
from hybrid_megatron.config.errors import RecipeError
from hybrid_megatron.config.loader import read_yaml
from hybrid_megatron.config.train import parse_count


class SweepSpec(BaseModel):
    """The ``sweep:`` section of a sweep file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    match: Literal["P", "F"]
    recipes: list[str] = Field(min_length=1, description="recipe files, relative to this file")
    tokens: list[int] | None = Field(default=None, min_length=1, description="token budgets")
    flops: list[PositiveFloat] | None = Field(
        default=None, min_length=1, description="F: training-FLOP budgets (instead of tokens)"
    )
    reference: str | None = Field(
        default=None, description="F with tokens: recipe stem (stem@label with sizes) setting the budget"
    )
    sizes: dict[str, list[str]] | None = Field(
        default=None, min_length=1, description="model sizes: label -> overrides, for every recipe"
    )
    overrides: list[str] = Field(default_factory=list)

    @field_validator("tokens", mode="before")
    @classmethod
    def _parse_tokens(cls, values):
        return values if values is None else [parse_count(v) for v in values]

    @field_validator("sizes")
    @classmethod
    def _check_sizes(cls, sizes):
        for label, overrides in (sizes or {}).items():
            if not re.fullmatch(r"[A-Za-z0-9_.]+", label):
                raise ValueError(f"size label {label!r}: use letters, digits, '_' or '.' (run names hold it)")
            if not overrides:
                raise ValueError(f"size {label!r} has no overrides (e.g. model.hidden_size=256)")
        return sizes

    @model_validator(mode="after")
    def _check_budgets(self) -> SweepSpec:
        if (self.tokens is None) == (self.flops is None):
            raise ValueError("give exactly one of tokens (token budgets) and flops (FLOP budgets)")
        if self.flops is not None and self.match != "F":
            raise ValueError("flops budgets need match: F (P-matched runs share a token budget)")
        if self.flops is not None and self.reference is not None:
            raise ValueError("reference is not used with flops budgets (every run gets the budget itself)")
        return self

    @property
    def budgets(self) -> list[float]:
        """The budgets as given: tokens, or FLOPs."""
        return list(self.tokens if self.tokens is not None else self.flops or [])


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its name, recipe, overrides and planned N, D, C.

    ``params`` is the total parameter count (what a run logs as ``model.num_parameters``),
    ``non_embedding`` the same without the embedding and output-layer matrices; ``size`` is the
    sweep's size label (None without ``sizes``).
    """

    name: str
    recipe_path: str
    overrides: tuple[str, ...]
    kind: str
    params: int
    tokens: int
    flops: float
    non_embedding: int = 0
    size: str | None = None


def load_sweep(path: str | Path, extra_overrides: tuple[str, ...] = ()) -> tuple[SweepSpec, list[SweepRun]]:
    """Read a sweep file and expand it into runs.

    Takes the sweep YAML path and overrides applied to every run (after the sweep's own and a
    size's). Returns the spec and the runs (budgets x recipes x sizes), each with overrides that
    set its size, token budget, run name, checkpoint directory and the ``hm.compare_group`` /
    ``hm.match`` tags. Raises RecipeError naming the file and field for a bad sweep or recipe.
    """
    path = Path(path).resolve()
    raw = read_yaml(path, what="sweep")
    if "sweep" not in raw:
        raise RecipeError(f"{path}: not a sweep file: it has no 'sweep:' section")
    try:
        spec = SweepSpec(**raw["sweep"])
    except ValidationError as err:
        first = err.errors()[0]
        loc = "".join(f".{p}" for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise RecipeError(f"{path}: sweep{loc}: {msg}") from None

    sizes: dict[str | None, list[str]] = {None: []}
    if spec.sizes:
        sizes = {label: overrides for label, overrides in spec.sizes.items()}
    bases = []  # (recipe path, size label, size overrides, recipe, FLOPs per token)
    for rel in spec.recipes:
        recipe_path = (path.parent / rel).resolve()
        for label, size_overrides in sizes.items():
            try:
                recipe = load_recipe(recipe_path, [*spec.overrides, *size_overrides, *extra_overrides])
            except RecipeError as err:
                if label is None:
                    raise
                raise RecipeError(f"{path}: sweep.sizes.{label} ({recipe_path.name}): {err}") from None
            per_token = model_flops_per_token(recipe.model, recipe.data.seq_length)
            bases.append((recipe_path, label, size_overrides, recipe, per_token))
    refs = [p.stem if label is None else f"{p.stem}@{label}" for p, label, _, _, _ in bases]
    if spec.match == "F" and spec.tokens is not None:
        if spec.reference not in refs:
            raise RecipeError(f"{path}: sweep.reference: {spec.reference!r} is not one of {refs}")
        ref_per_token = bases[refs.index(spec.reference)][4]

    runs = []
    for budget in spec.budgets:
        for recipe_path, label, size_overrides, recipe, per_token in bases:
            if spec.flops is not None:
                tokens = round(budget / per_token)
            elif spec.match == "P":
                tokens = int(budget)
            else:
                tokens = round(budget * ref_per_token / per_token)
            stem = recipe_path.stem if label is None else f"{recipe_path.stem}-{label}"
            tag = _short(budget) if spec.flops is None else _short_flops(budget)
            name = f"{spec.name}-{stem}-{tag}"
            # beside the base recipe's own runs: <runs>/<sweep name>/<run name>/checkpoints
            run_dir = Path(recipe.run_dir).parent / spec.name / name
            overrides = (
                *spec.overrides,
                *size_overrides,
                *extra_overrides,
                "train.steps=null",
                f"train.tokens={tokens}",
                f"name={name}",
                f"checkpoint.dir={run_dir / 'checkpoints'}",
                f"tracking.compare_group={spec.name}",
                f"tracking.match={spec.match}",
            )
            params = count_parameters(recipe.model)
            runs.append(
                SweepRun(
                    name=name,
                    recipe_path=str(recipe_path),
                    overrides=overrides,
                    kind=recipe.model.kind,
                    params=params.total,
                    tokens=tokens,
                    flops=per_token * tokens,
                    non_embedding=params.non_embedding,
                    size=label,
                )
            )
    return spec, runs


def _short_flops(c: float) -> str:
    """A FLOP budget as a run-name part: 1e16, 3e16, 1.5e17."""
    mantissa, exponent = f"{c:.3e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _short(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return str(int(n))


def format_sweep_table(spec: SweepSpec, runs: list[SweepRun]) -> str:
    """A fixed-width table of the runs (name, kind, N total and non-embedding, D, C) and their
    total compute, for ``--dry-run``."""
    width = max([44] + [len(r.name) for r in runs])
    lines = [
        f"sweep {spec.name}: {len(runs)} runs, {spec.match}-matched",
        f"{'run':<{width}} {'kind':<12} {'N (params)':>12} {'N non-emb':>12} "
        f"{'D (tokens)':>14} {'C (FLOPs)':>12}",
    ]
    for r in runs:
        lines.append(
            f"{r.name:<{width}} {r.kind:<12} {r.params:>12,} {r.non_embedding:>12,} "
            f"{r.tokens:>14,} {r.flops:>12.3e}"
        )
    lines.append(f"total compute of the {len(runs)} runs: {sum(r.flops for r in runs):.3e} FLOPs")
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
