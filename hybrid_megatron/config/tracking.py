"""The recipe's ``tracking:`` section: the MLflow run a training logs to.

Example (YAML)::

    tracking:
      experiment: hybrid-1b
      tags: {owner: me}
      compare_group: paper-1b-P      # runs compared with each other (e.g. one sweep's)
      match: P                       # P: parameter-matched, F: FLOP-matched
      scale: 1b
      variant: moe                   # an ablation: compared as its own column, "inter-moe"

``tracking_uri`` left out means ``sqlite:///<parent of the run directory>/mlruns.db``; the
trainer resolves it (see `default_tracking_uri`). ``run_name`` left out is the recipe's name.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator

from hybrid_megatron.config.base import StrictSection, string_map


def default_tracking_uri(run_dir: str) -> str:
    """The default MLflow store for a run directory: ``sqlite:///<parent of run_dir>/mlruns.db``.

    Takes the run directory (absolute); returns the tracking URI string. Runs of all recipes
    under one ``runs/`` folder then share one store, so they can be compared.
    """
    parent = os.path.dirname(os.path.abspath(run_dir))
    return f"sqlite:///{os.path.join(parent, 'mlruns.db')}"


class TrackingConfig(StrictSection):
    """MLflow settings (the recipe's ``tracking:`` section)."""

    enabled: bool = Field(default=True, description="log to MLflow (rank 0 only)")
    tracking_uri: str | None = Field(
        default=None, description="MLflow URI; default sqlite:///<run dir parent>/mlruns.db"
    )
    experiment: str = Field(default="hybrid_megatron", min_length=1)
    run_name: str | None = Field(default=None, description="default: the recipe's name")
    tags: dict[str, str] = Field(default_factory=dict, description="extra MLflow tags")
    compare_group: str | None = Field(default=None, description="tag hm.compare_group")
    match: Literal["P", "F"] | None = Field(
        default=None, description="tag hm.match: P parameter-matched, F FLOP-matched"
    )
    scale: str | None = Field(default=None, description="tag hm.scale, e.g. 1b")
    variant: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="tag hm.variant: what sets the run apart from others of its kind in a "
        "comparison (an ablation: moe, ratio-1:1); compare and fit then treat <kind>-<variant> "
        "as a kind of its own",
    )

    @field_validator("tags", mode="before")
    @classmethod
    def _stringify_tags(cls, value: Any) -> Any:
        return string_map(value)  # MLflow tags are strings

    @field_validator("scale", "compare_group", "run_name", "variant", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        return value if value is None or isinstance(value, str) else str(value)
