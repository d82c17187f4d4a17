"""Rebuild a trained model from a checkpoint alone (for conversion, evaluation, inference)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron.core import parallel_state

from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.training.checkpoint import (
    LATEST,
    RECIPE_FILE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint root (holding ``latest``) or one step directory -> the step directory.

    Raises CheckpointError naming the path when neither is found.
    """
    path = Path(path)
    if (path / LATEST).exists():
        return latest_checkpoint(str(path))
    if (path / "metadata.json").exists():
        return path
    raise CheckpointError(f"{path}: neither a checkpoint directory nor a root with '{LATEST}'")


def load_trained_model(checkpoint: str | Path, parallel: Optional[ParallelConfig] = None, seed: int = 1):
    """Load the model of a training checkpoint at any parallel layout (default TP=PP=1).

    Takes a checkpoint root or step directory and the layout to load at; joins (or creates, as
    a single rank) the process group, sets up megatron-core's parallel state, rebuilds the
    model from the ``recipe.yaml`` saved with the checkpoint and loads its weights. Returns
    ``(recipe, model)`` with the model in eval mode (on GPU when CUDA is available).
    """
    import torch

    from hybrid_megatron.config.loader import read_yaml
    from hybrid_megatron.config.recipe import validate_recipe
    from hybrid_megatron.models import build_model
    from hybrid_megatron.training.distributed import init_distributed_from_env
    from hybrid_megatron.training.parallel_setup import setup_model_parallel

    step_dir = resolve_checkpoint(checkpoint)
    recipe_file = step_dir / RECIPE_FILE
    if not recipe_file.exists():
        raise CheckpointError(f"{step_dir}: has no {RECIPE_FILE}; cannot tell which model it holds")
    recipe = validate_recipe(read_yaml(recipe_file), step_dir, str(recipe_file))
    parallel = parallel or ParallelConfig()
    init_distributed_from_env()
    setup_model_parallel(parallel, seed)
    model = build_model(
        recipe.model,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel=parallel,
    )
    if torch.cuda.is_available():
        model.cuda()
    load_checkpoint(step_dir, [model], None, None)
    model.eval()
    return recipe, model
