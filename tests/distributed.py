"""Run a function on N local processes with a gloo process group (CPU multi-rank tests)."""

from __future__ import annotations

import json
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    import warnings

    import torch
    import torch.distributed as dist

    # megatron-core announces its fallbacks (no TE, no apex) once per import; expected on CPU.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    from hybrid_megatron import runtime

    runtime.setup()  # a spawned process starts bare: the CPU shims, as every entry point
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result: Any
    try:
        result = {"ok": True, "value": fn(rank, world, *args)}
    except BaseException:  # reported to the parent test, which fails with the traceback
        result = {"ok": False, "error": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    except Exception:
        pass


def run_distributed(fn: Callable, world: int, tmp_path: Path, *args) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return each rank's JSON result.

    ``fn`` must be importable (module level) and return JSON-serialisable data. Raises
    AssertionError with the rank's traceback if any rank failed.
    """
    out_dir = tmp_path / f"ranks-{free_port()}"
    out_dir.mkdir()
    mp.start_processes(
        _entry,
        args=(world, free_port(), fn, args, str(out_dir)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    results = []
    for rank in range(world):
        data = json.loads((out_dir / f"rank{rank}.json").read_text())
        if not data["ok"]:
            raise AssertionError(f"rank {rank} failed:\n{data['error']}")
        results.append(data["value"])
    return results


def build_parallel_model(cfg_dict: dict, parallel: dict):
    """Inside a rank: megatron-core's parallel state for ``parallel`` (a ParallelConfig dict) and
    this rank's part of the model of ``cfg_dict`` (seed 7)."""
    from megatron.core import parallel_state

    from hybrid_megatron.config.model import ModelConfig
    from hybrid_megatron.config.parallel import ParallelConfig
    from hybrid_megatron.models import build_model
    from hybrid_megatron.training.parallel_setup import setup_model_parallel

    pcfg = ParallelConfig(**parallel)
    setup_model_parallel(pcfg, seed=7)
    return build_model(
        ModelConfig(**cfg_dict),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel=pcfg,
    )
