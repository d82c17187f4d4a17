"""Rebuild a trained model from a checkpoint alone (for conversion, evaluation, inference)."""

from __future__ import annotations

from pathlib import Path

from megatron.core import parallel_state

from hybrid_megatron.checkpoint_layout import (
    CheckpointError,
    read_saved_model,
    read_saved_recipe,
    resolve_checkpoint,
)
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.training.checkpoint import (
    LOAD_ERRORS,
    check_checkpoint_files,
    describe_load_failure,
    load_checkpoint,
)


def load_trained_model(checkpoint: str | Path, parallel: ParallelConfig | None = None, seed: int = 1):
    """Load the model of a training checkpoint at any parallel layout (default TP=PP=1).

    Takes a checkpoint root or step directory and the layout to load at; joins (or creates, as
    a single rank) the process group, sets up megatron-core's parallel state, rebuilds the
    model from the ``recipe.yaml`` saved with the checkpoint and loads its weights. Returns
    ``(recipe, model)`` with the model in eval mode (on GPU when CUDA is available). Raises
    CheckpointError naming the file for a missing or truncated one, before building anything.
    """
    import torch

    from hybrid_megatron.models import build_model
    from hybrid_megatron.training.distributed import init_distributed_from_env
    from hybrid_megatron.training.parallel_setup import setup_model_parallel

    step_dir = resolve_checkpoint(checkpoint)
    check_checkpoint_files(step_dir)
    recipe = read_saved_recipe(step_dir)
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


def init_weights_from(path: str | Path, model_chunks, model_cfg) -> Path:
    """Load only the model weights of a checkpoint into freshly built model chunks.

    Takes a from-hf output directory or a training checkpoint (root or step directory), this
    rank's (wrapped) model chunks and the recipe's ModelConfig; all ranks call it, at any
    parallel layout (megatron-core reshards). Optimizer, schedule and step are not touched.
    Returns the step directory read. Raises CheckpointError naming ``checkpoint.init_from``
    when the path holds no checkpoint, lacks one of its files or holds a truncated or corrupt
    shard (naming the file), holds a different model (flavour, layer pattern, Mamba FFNs, tied
    embeddings, norm epsilon) or its weights do not fit.
    """
    from megatron.core import dist_checkpointing

    from hybrid_megatron.config.layer_pattern import build_layer_pattern
    from hybrid_megatron.training.model_setup import unwrap

    try:
        step_dir = resolve_checkpoint(path)
        check_checkpoint_files(step_dir)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint.init_from: {err}") from None
    saved = read_saved_model(step_dir)
    if saved is not None:
        pairs = {
            "model.flavour": (saved.flavour, model_cfg.flavour),
            "model layer pattern": (build_layer_pattern(saved), build_layer_pattern(model_cfg)),
            "model.mamba_block_ffn": (saved.mamba_block_ffn, model_cfg.mamba_block_ffn),
            "model.tie_embeddings": (saved.tie_embeddings, model_cfg.tie_embeddings),
            "model.norm_epsilon": (saved.norm_epsilon, model_cfg.norm_epsilon),
        }
        for field, (theirs, ours) in pairs.items():
            if theirs != ours:
                raise CheckpointError(
                    f"checkpoint.init_from: {step_dir} holds a model with {field} {theirs!r}, "
                    f"the recipe's is {ours!r}"
                )
    model = unwrap(model_chunks[0])
    try:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(step_dir))
        model.load_state_dict(loaded["model"])
    except LOAD_ERRORS as err:  # megatron raises many types; the user needs the path and cause
        raise CheckpointError(
            f"checkpoint.init_from: cannot load model weights from {step_dir}: "
            f"{describe_load_failure(step_dir, err)}"
        ) from err
    return step_dir
