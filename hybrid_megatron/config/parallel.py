"""The recipe's ``parallel:`` section: how the model is split over ranks."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ParallelConfig(BaseModel):
    """Tensor, pipeline, context and expert parallel sizes; data parallel is what remains of the
    world."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tp: int = Field(default=1, gt=0, description="tensor-parallel size")
    pp: int = Field(default=1, gt=0, description="pipeline-parallel size")
    ep: int = Field(default=1, gt=0, description="expert-parallel size (MoE)")
    expert_tp: int | None = Field(
        default=None,
        gt=0,
        description="tensor-parallel size of the experts (MoE): null = tp (megatron-core's default); "
        "1 with tp > 1 keeps experts whole and spreads them over the TP ranks as well (MoE "
        "parallel folding: tp 2 x ep 2 then fits 2 GPUs)",
    )
    cp: int = Field(
        default=1,
        gt=0,
        description="context-parallel size: each sequence is split over this many ranks (2 x cp "
        "chunks, rank r holds chunks r and 2cp-1-r, so causal work is balanced)",
    )
    cp_comm: Literal["p2p", "all_gather", "a2a"] = Field(
        default="p2p",
        description="how attention exchanges keys and values under cp > 1 on GPU (Transformer "
        "Engine): p2p ring, all_gather or a2a; the CPU (local) build always all-gathers",
    )
    mamba_cp: Literal["heads", "sequence"] = Field(
        default="sequence",
        description="how Mamba2 layers split under cp > 1: heads (megatron-core's all-to-all, "
        "needs Mamba heads divisible by tp*cp) or sequence (each rank scans its slices and passes "
        "the SSM state on; no cap on cp)",
    )
    sequence_parallel: bool = Field(default=False, description="needs tp > 1")
    pipeline_stage_layers: list[int] | None = Field(
        default=None, description="explicit blocks per pipeline stage; default an even split"
    )
    pp_split: Literal["even", "balanced"] = Field(
        default="even",
        description="stage boundaries without pipeline_stage_layers: even = the same number of "
        "blocks per stage; balanced = the boundaries that minimise the slowest stage's predicted "
        "time (embedding on the first, LM head on the last stage) within the GPU's memory",
    )

    @model_validator(mode="after")
    def _one_split(self) -> ParallelConfig:
        if self.pp_split == "balanced" and self.pipeline_stage_layers is not None:
            raise ValueError(
                "parallel.pp_split: balanced chooses the stage boundaries; drop "
                "parallel.pipeline_stage_layers or set pp_split: even"
            )
        return self

    @property
    def expert_tensor_parallel(self) -> int:
        """The experts' tensor-parallel size: ``expert_tp``, else ``tp``."""
        return self.expert_tp or self.tp

    @property
    def expert_group_size(self) -> int:
        """Ranks that share one copy of the experts: ``ep`` x the experts' tensor-parallel size
        (megatron-core carves these groups out of each pipeline stage's dp*tp ranks)."""
        return self.ep * self.expert_tensor_parallel
