"""A whole training recipe: the sections together, and `load_recipe` (YAML -> validated Recipe).

Loading order: the recipe file, merged over everything it ``extends`` (a chain, each path
relative to the file naming it; dicts merge, the child wins, anything else is replaced);
then the CLI overrides ``a.b.c=value`` (value parsed as YAML); then validation.

Path rule: every relative path in a recipe (data prefixes, tokenizer, data cache dir,
checkpoint dir and resume path), including paths given as overrides and paths inherited
from a base file, is resolved against the directory of the recipe file passed to
`load_recipe`. Shipped recipes live in ``recipes/`` and therefore say ``../data/...`` and
``../runs/...``, and so do the bases in ``recipes/bases/`` (their paths resolve from the
recipe extending them).

``name`` and ``description`` describe one file and are not inherited; ``name`` defaults to the
file's stem. ``{name}`` inside ``checkpoint.dir`` is replaced by the name, and the name is the
default of ``tracking.run_name`` and ``slurm.job_name``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from hybrid_megatron.config.checkpoint import DEFAULT_DIR, CheckpointConfig
from hybrid_megatron.config.data import DataConfig
from hybrid_megatron.config.errors import RecipeError, format_validation_error
from hybrid_megatron.config.loader import (
    apply_overrides,
    display_path,
    load_chain,
    source_lookup,
)
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.config.parallel_layout import check_parallel_layout, check_sequence_split
from hybrid_megatron.config.slurm import SlurmConfig
from hybrid_megatron.config.tracking import TrackingConfig, default_tracking_uri
from hybrid_megatron.config.train import TrainConfig


def check_cuda_graphs(recipe: Recipe) -> None:
    """Raise ValueError naming ``train.cuda_graphs`` for what per-layer CUDA graphs cannot take.

    A graph replays fixed shapes and fixed kernel launches with no host waits: MoE layers qualify
    only with the grouped experts on one expert-parallel rank (their token counts stay on the
    GPU, their buffers have fixed sizes); recompute / pipeline schedules / tensor-parallel
    collectives inside graphs are layouts this project has not verified on GPUs yet.
    """
    why = None
    moe = recipe.model.moe
    if moe is not None and (moe.experts != "grouped" or recipe.parallel.ep > 1):
        why = (
            "MoE layers need model.moe.experts grouped and parallel.ep 1 (other experts, and "
            "expert parallelism, read each expert's token count on the host every layer)"
        )
    elif recipe.train.recompute != "none":
        why = f"not combined with train.recompute {recipe.train.recompute!r} (use none)"
    elif recipe.parallel.tp > 1 or recipe.parallel.pp > 1:
        why = "only with parallel.tp = parallel.pp = 1 so far (data parallelism is fine)"
    elif recipe.train.precision != "bf16":
        why = "needs train.precision bf16 (it is a GPU feature)"
    if why:
        raise ValueError(f"train.cuda_graphs: {why}")


def check_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Check, before any job is submitted, that the model can be laid out on ``parallel``.

    The builder's own check (block pattern, pipeline split, heads / groups / experts / vocab
    against TP and EP, sequence-parallel rules); raises ValueError naming the field.
    """
    check_parallel_layout(model, parallel, parallel.tp, parallel.ep)


class Recipe(BaseModel):
    """One training run: what to build, on what layout, on which data, how, and where.

    Build it with `load_recipe` (files) or ``Recipe.model_validate(mapping,
    context={"base_dir": DIR})`` (relative paths then resolve against DIR).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="run name; default the recipe file's stem")
    description: str | None = None
    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    slurm: SlurmConfig = SlurmConfig()

    # Where the recipe came from (not part of the schema; set by load_recipe).
    _source: str | None = PrivateAttr(default=None)
    _overrides: tuple = PrivateAttr(default=())

    @model_validator(mode="before")
    @classmethod
    def _fill_name_defaults(cls, data: Any) -> Any:
        # Name-dependent defaults are filled on the raw mapping, before the sections validate.
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return data
        name = data["name"]
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
            return data  # the after-validator reports it
        data = dict(data)
        for section, key, default in (
            ("checkpoint", "dir", DEFAULT_DIR),
            ("tracking", "run_name", name),
            ("slurm", "job_name", name),
        ):
            part = data.get(section)
            if part is None:
                part = {}
            if not isinstance(part, dict):
                continue
            part = dict(part)
            value = part.get(key)
            if value is None:
                value = default
            if isinstance(value, str):
                value = value.replace("{name}", name)
            part[key] = value
            data[section] = part
        return data

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", self.name):
            raise ValueError(
                f"name: {self.name!r} must be letters, digits and . _ + - (it names directories)"
            )
        if self.data.seq_length > self.model.max_position_embeddings:
            raise ValueError(
                f"data.seq_length: {self.data.seq_length} exceeds model.max_position_embeddings "
                f"{self.model.max_position_embeddings}"
            )
        if self.model.fp8 is not None and self.train.precision != "bf16":
            raise ValueError("model.fp8: needs train.precision bf16")
        if self.train.cuda_graphs:
            check_cuda_graphs(self)
        check_layout(self.model, self.parallel)
        check_sequence_split(self.data.seq_length, self.parallel)
        return self

    @property
    def source(self) -> str | None:
        """The recipe file this was loaded from (absolute), or None."""
        return self._source

    @property
    def overrides(self) -> tuple:
        """The CLI overrides applied on top of the file, in order."""
        return self._overrides

    @property
    def run_dir(self) -> str:
        """The run directory (parent of ``checkpoint.dir``): launcher logs live under it."""
        return self.checkpoint.run_dir

    def tracking_uri(self) -> str:
        """``tracking.tracking_uri``, or the default ``sqlite:///<run dir parent>/mlruns.db``."""
        return self.tracking.tracking_uri or default_tracking_uri(self.run_dir)

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (JSON types), loadable again as a recipe."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved recipe as YAML text (absolute paths; every default written out)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)


def validate_recipe(
    data: dict,
    base_dir: os.PathLike | str,
    source: str = "recipe",
    provenance: dict | None = None,
) -> Recipe:
    """Validate a merged recipe mapping; relative paths resolve against ``base_dir``.

    Takes the mapping, the base directory, the name used in messages and optionally the
    path -> source map from `hybrid_megatron.config.loader`; returns the Recipe. Raises
    RecipeError with one line per problem, each naming the dotted path.
    """
    try:
        return Recipe.model_validate(data, context={"base_dir": os.fspath(base_dir)})
    except ValidationError as err:
        lookup = source_lookup(provenance or {}, source)
        raise RecipeError(format_validation_error(Recipe, err, lookup)) from None


def load_recipe(path: os.PathLike | str, overrides: Iterable[str] = ()) -> Recipe:
    """Load, merge, override and validate a recipe file.

    Takes the YAML path and CLI overrides (``a.b.c=value``, value parsed as YAML); returns the
    validated, frozen Recipe with every relative path absolute. Raises RecipeError (a
    ValueError) whose message names the file and the dotted path of each problem.
    """
    path = Path(path).expanduser().resolve()
    overrides = tuple(overrides)
    provenance: dict = {}
    data = load_chain(path, provenance)
    if data.get("name") is None:
        data["name"] = path.stem
    data = apply_overrides(data, overrides, provenance)
    recipe = validate_recipe(data, path.parent, display_path(path), provenance)
    recipe._source = str(path)
    recipe._overrides = overrides
    return recipe
