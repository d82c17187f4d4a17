"""The recipe's ``slurm:`` section: the allocation ``launch/slurm.py`` asks SLURM for.

Example (YAML)::

    slurm:
      nodes: 4
      gpus_per_node: 8              # one task (rank) per GPU
      cpus_per_task: 12
      mem_gb: 0                     # 0: all of the node's memory (sbatch --mem=0)
      partition: gpu
      account: my-account
      time: "48:00:00"              # minutes, or [D-]HH:MM:SS
      container_image: /path/to/hybrid_megatron.sqsh    # pyxis/enroot
      container_mounts: ["/data:/data"]
      env: {NCCL_DEBUG: WARN}
      setup: ["module load cuda/12.8"]

Everything maps onto submitit's SlurmExecutor parameters (see ``hybrid_megatron.launch.slurm``);
nothing here is read by the trainer.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from hybrid_megatron.config.base import StrictSection, string_map


def parse_minutes(value: Any) -> Any:
    """Parse a SLURM time limit into whole minutes (rounded up).

    Accepts an int (minutes) or SLURM's text forms ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
    ``D-HH:MM``, ``D-HH:MM:SS``; returns an int. Raises ValueError for other text.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        return value
    text = value.strip()
    days = 0
    match = re.fullmatch(r"(\d+)-(.+)", text)
    if match:
        days, text = int(match.group(1)), match.group(2)
        parts = text.split(":")
        if not all(p.isdigit() for p in parts) or len(parts) > 3:
            raise ValueError(f"expected minutes or [D-]HH:MM:SS, got {value!r}")
        hours, minutes, seconds = ([int(p) for p in parts] + [0, 0])[:3]
    else:
        parts = text.split(":")
        if not all(p.isdigit() for p in parts) or len(parts) > 3:
            raise ValueError(f"expected minutes or [D-]HH:MM:SS, got {value!r}")
        numbers = [int(p) for p in parts]
        if len(numbers) == 1:
            hours, minutes, seconds = 0, numbers[0], 0
        elif len(numbers) == 2:
            hours, minutes, seconds = 0, numbers[0], numbers[1]
        else:
            hours, minutes, seconds = numbers
    total_seconds = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return -(-total_seconds // 60)


class SlurmConfig(StrictSection):
    """SLURM allocation and job environment (the recipe's ``slurm:`` section)."""

    nodes: int = Field(default=1, gt=0)
    gpus_per_node: int = Field(default=8, ge=0, description="GPUs per node; 0 for CPU-only clusters")
    tasks_per_node: int | None = Field(
        default=None, gt=0, description="ranks per node; default gpus_per_node (1 without GPUs)"
    )
    cpus_per_task: int | None = Field(default=None, gt=0)
    mem_gb: float | None = Field(default=None, ge=0, description="per node; 0 = all of it")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int = Field(default=60, gt=0, description="time limit in minutes (or [D-]HH:MM:SS text)")
    constraint: str | None = None
    exclusive: bool = Field(default=False, description="whole nodes (sbatch --exclusive)")
    job_name: str | None = Field(default=None, description="default: the recipe's name")
    container_image: str | None = Field(default=None, description="pyxis --container-image")
    container_mounts: list[str] = Field(default_factory=list, description="pyxis SRC:DST mounts")
    env: dict[str, str] = Field(default_factory=dict, description="exported before the job starts")
    setup: list[str] = Field(default_factory=list, description="shell lines run before srun")
    array_parallelism: int = Field(default=16, gt=0, description="array tasks running at once")
    signal_delay_s: int = Field(
        default=120, ge=0, description="USR2 this long before the time limit (checkpoint + requeue)"
    )
    max_timeouts: int = Field(default=3, ge=0, description="requeues after hitting the time limit")
    sbatch_extra: dict[str, str | int | bool] = Field(
        default_factory=dict, description="more #SBATCH options, e.g. {gres: 'gpu:8'}"
    )
    srun_extra: list[str] = Field(default_factory=list, description="more srun arguments")

    @field_validator("time", mode="before")
    @classmethod
    def _parse_time(cls, value: Any) -> Any:
        return parse_minutes(value)

    @field_validator("container_mounts", mode="before")
    @classmethod
    def _split_mounts(cls, value: Any) -> Any:
        # pyxis itself takes one comma-separated string; accept that form too.
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _stringify_env(cls, value: Any) -> Any:
        return string_map(value)

    @model_validator(mode="after")
    def _check(self) -> SlurmConfig:
        for key in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"slurm.env: {key!r} is not a valid environment variable name")
        return self

    @property
    def ranks_per_node(self) -> int:
        """Tasks started on each node: tasks_per_node, else one per GPU, else 1."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        """Ranks of the whole job: nodes x ranks_per_node."""
        return self.nodes * self.ranks_per_node
