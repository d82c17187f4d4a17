"""What every recipe section shares: the strict pydantic base and the field helpers."""

from __future__ import annotations

import os
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class StrictSection(BaseModel):
    """Base of every recipe section: unknown keys are errors (a typo never silently falls back
    to a default), numbers are finite and never booleans, and a validated section is immutable."""

    # allow_inf_nan=False: an infinite ``lr: .inf`` would train a run of NaN weights to the end.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse true/false for a numeric field (pydantic would read them as 1 and 0, so
        ``num_layers: true`` built a one-layer model). Returns the value unchanged."""
        if isinstance(value, bool):
            assert info.field_name is not None  # a field validator always has its field
            annotation = cls.model_fields[info.field_name].annotation
            types = set(typing.get_args(annotation)) or {annotation}
            if types & {int, float} and bool not in types:
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


def resolve_path(path: str, info: ValidationInfo) -> str:
    """``path`` with ~ expanded and joined to the validation context's ``base_dir`` if relative.

    Takes the path text and pydantic's ValidationInfo (the loader puts the recipe file's folder
    in ``context["base_dir"]``); returns a normalised path string.
    """
    path = os.path.expanduser(str(path))
    base = (info.context or {}).get("base_dir")
    if base is not None and not os.path.isabs(path):
        path = os.path.join(str(base), path)
    return os.path.normpath(path)


def string_map(value: Any) -> Any:
    """A mapping's keys and values as strings (None becomes ""); anything else unchanged, so
    pydantic reports the type error. YAML turns ``seed: 1`` or ``final: true`` into numbers and
    bools where environment variables and MLflow tags need strings."""
    if isinstance(value, dict):
        return {str(k): "" if v is None else str(v) for k, v in value.items()}
    return value
