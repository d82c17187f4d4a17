"""Read the model section (and the training sequence length) from a recipe or model YAML.

Three kinds of file are accepted:

- a full recipe: loaded with the project's recipe loader ``hybrid_megatron.config.load_recipe``
  (``extends`` chains, validation of every section); the sequence length is ``data.seq_length``;
- a partial recipe (a ``model:`` section, possibly through ``extends``, but other sections
  missing or incomplete): only its model section is validated, with ModelConfig, and a note
  says so;
- a bare model section (the mapping has neither ``model`` nor ``extends``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from hybrid_megatron.config.model import ModelConfig


@dataclass
class ModelSource:
    """What the accounting reads from a YAML file.

    ``seq_len`` is the recipe's ``data.seq_length`` (None for a bare model section); ``note``
    says when a partial recipe's model section was used on its own.
    """

    model: ModelConfig
    seq_len: int | None
    note: str | None = None


def _merged_recipe(path: Path) -> dict:
    """The recipe mapping with its ``extends`` chain merged (the raw file if no loader)."""
    try:
        from hybrid_megatron.config.loader import load_chain
    except ImportError:  # loader hook: without the project's loader, read the file alone
        return yaml.safe_load(path.read_text())
    return load_chain(path, {})


def load_model_source(path: str | Path) -> ModelSource:
    """Load a ModelConfig (and sequence length) from a recipe, partial recipe or model YAML.

    Takes the file path; returns a ModelSource. Raises ValueError for a file that is not a
    YAML mapping, pydantic's ValidationError (a ValueError naming the field) for an invalid
    model section, and OSError for an unreadable file.
    """
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping (a recipe or a model section)")
    if "model" not in data and "extends" not in data:
        return ModelSource(ModelConfig(**data), None)

    try:
        from hybrid_megatron.config import load_recipe
    except ImportError:
        load_recipe = None
    if load_recipe is not None:
        try:
            recipe = load_recipe(path)
            return ModelSource(recipe.model, recipe.data.seq_length)
        except ValueError as err:  # RecipeError: fall back to the model section alone
            problem = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            note = f"not a complete recipe ({problem} ...); accounting its model section only"
    else:
        note = None
    merged = _merged_recipe(path)
    if "model" not in merged:
        raise ValueError(f"{path}: no model section")
    seq_len = (merged.get("data") or {}).get("seq_length")
    return ModelSource(ModelConfig(**merged["model"]), int(seq_len) if seq_len else None, note)


def load_model_config(path: str | Path) -> tuple[ModelConfig, int | None]:
    """``load_model_source`` as a (ModelConfig, sequence length or None) pair."""
    source = load_model_source(path)
    return source.model, source.seq_len
