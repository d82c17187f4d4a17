"""The recipe's ``parallel:`` section: how the model is split over ranks."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class ParallelConfig(BaseModel):
    """Tensor, pipeline and expert parallel sizes; data parallel is what remains of the world."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tp: int = Field(default=1, gt=0, description="tensor-parallel size")
    pp: int = Field(default=1, gt=0, description="pipeline-parallel size")
    ep: int = Field(default=1, gt=0, description="expert-parallel size (MoE)")
    sequence_parallel: bool = Field(default=False, description="needs tp > 1")
    pipeline_stage_layers: Optional[list[int]] = Field(
        default=None, description="explicit blocks per pipeline stage; default an even split"
    )
