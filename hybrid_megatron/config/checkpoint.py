"""The recipe's ``checkpoint:`` section: where checkpoints go, how often, and what to resume.

Example (YAML)::

    checkpoint:
      dir: ../runs/{name}/checkpoints   # {name} is the recipe's name
      interval: 500                     # steps between saves
      keep_last: 3
      resume: auto                      # auto | none | a checkpoint directory
      init_from: ../converted/nemotron  # optional: start from these weights (see below)

The run directory of a recipe is the parent of ``dir`` (``runs/<name>``): the launcher writes
its logs there and the default MLflow store sits in its parent. Relative paths are resolved
against the recipe file's directory (see ``hybrid_megatron.config.recipe``).

``init_from`` starts a run from pretrained weights (continued pretraining, fine-tuning): a
directory written by ``python -m hybrid_megatron.convert from-hf`` or any training checkpoint
(root or step directory). Only the model weights are read; the optimizer, LR schedule, data
position and step start fresh (step 0). It applies when there is nothing to resume, so a
preempted and requeued run resumes from its own checkpoints instead of starting over.
"""

from __future__ import annotations

import os

from pydantic import Field, ValidationInfo, field_validator, model_validator

from hybrid_megatron.config.base import StrictSection, resolve_path

DEFAULT_DIR = "runs/{name}/checkpoints"


class CheckpointConfig(StrictSection):
    """Checkpoint location and policy (the recipe's ``checkpoint:`` section)."""

    dir: str = Field(default=DEFAULT_DIR, min_length=1, description="checkpoint root; {name} allowed")
    interval: int = Field(default=1000, gt=0, description="steps between saves")
    keep_last: int = Field(default=3, gt=0, description="checkpoints kept; older ones are deleted")
    resume: str = Field(
        default="auto",
        min_length=1,
        description="auto: latest checkpoint in dir if any; none: start fresh; else a checkpoint path",
    )
    save_on_exit: bool = Field(default=True, description="save when training ends or is signalled")
    init_from: str | None = Field(
        default=None,
        min_length=1,
        description="weights to start from when there is nothing to resume: a from-hf output "
        "or a training checkpoint; model weights only (fresh optimizer, step 0)",
    )

    @field_validator("dir")
    @classmethod
    def _resolve_dir(cls, value: str, info: ValidationInfo) -> str:
        return resolve_path(value, info)

    @field_validator("resume")
    @classmethod
    def _resolve_resume(cls, value: str, info: ValidationInfo) -> str:
        if value in ("auto", "none"):
            return value
        return resolve_path(value, info)

    @field_validator("init_from")
    @classmethod
    def _resolve_init_from(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_path(value, info)

    @model_validator(mode="after")
    def _one_start(self) -> CheckpointConfig:
        if self.init_from is not None and self.resume not in ("auto", "none"):
            raise ValueError(
                "checkpoint.init_from: not with an explicit checkpoint.resume path (resume "
                "continues a run, init_from starts one)"
            )
        return self

    @property
    def run_dir(self) -> str:
        """The run directory: the parent of ``dir`` (holds launcher logs)."""
        return os.path.dirname(os.path.normpath(self.dir))
