"""Initialise megatron-core's model-parallel state and RNG streams from a ParallelConfig."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from hybrid_megatron.config.derived import data_parallel_size
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.models.transformer_config import have_transformer_engine


def setup_model_parallel(parallel: ParallelConfig, seed: int, cuda_graphs: bool = False) -> None:
    """Create TP/CP/PP/EP (+ expert TP)/DP groups for the running process group and seed every RNG stream.

    Takes the ParallelConfig, the run's seed and whether layers will run in CUDA graphs
    (``train.cuda_graphs``: megatron-core then needs a graph-safe RNG tracker, TE's where TE is
    installed, which draws the same streams from the same seeds); the default process group must exist
    (``torch.distributed.init_process_group``). An earlier state of the same TP/CP/PP/EP/expert-TP sizes is
    kept (only re-seeded); another layout is destroyed first, so a process can switch layouts
    (the resharding tests do). Returns nothing. Raises
    ValueError naming ``parallel`` when the world size does not factor into the layout.
    """
    data_parallel_size(parallel, dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        current = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        )
        if current == (parallel.tp, parallel.cp, parallel.pp, parallel.ep, parallel.expert_tensor_parallel):
            # Same layout: keep the groups (megatron-core's destroy drops its references but
            # leaves every gloo group's threads alive), only re-seed below.
            _seed(seed, cuda_graphs)
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel,
    )
    _seed(seed, cuda_graphs)


def _seed(seed: int, cuda_graphs: bool) -> None:
    """Seed the default generator and megatron-core's per-rank streams (TP, expert)."""
    torch.manual_seed(seed)
    # Under graph capture TE's attention accepts only TE's own (graph-safe) tracker; both it and
    # megatron-core's graph-safe tracker seed one generator per stream as the plain one does.
    model_parallel_cuda_manual_seed(
        seed,
        force_reset_rng=True,
        use_cudagraphable_rng=cuda_graphs,
        te_rng_tracker=cuda_graphs and have_transformer_engine(),
    )
