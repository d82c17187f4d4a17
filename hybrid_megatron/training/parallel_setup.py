"""Initialise megatron-core's model-parallel state and RNG streams from a ParallelConfig."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from hybrid_megatron.config.parallel import ParallelConfig


def setup_model_parallel(parallel: ParallelConfig, seed: int) -> None:
    """Create TP/PP/EP/DP groups for the running process group and seed every RNG stream.

    Takes the ParallelConfig and the run's seed; the default process group must exist
    (``torch.distributed.init_process_group``). Any earlier model-parallel state is destroyed
    first, so a process can switch layouts (the resharding tests do). Returns nothing. Raises
    ValueError naming ``parallel`` when the world size does not factor into the layout.
    """
    world = dist.get_world_size()
    model_ranks = parallel.tp * parallel.pp
    if world % model_ranks:
        raise ValueError(
            f"parallel: world size {world} is not divisible by tp*pp = {model_ranks}"
        )
    dp = world // model_ranks
    if (dp * parallel.tp) % parallel.ep:
        raise ValueError(f"parallel.ep: {parallel.ep} does not divide dp*tp = {dp * parallel.tp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
