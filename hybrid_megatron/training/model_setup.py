"""This rank's model chunk, ready for training: precision wrapper and megatron-core DDP."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.transformer.module import Float16Module

from hybrid_megatron.models import build_model
from hybrid_megatron.models.transformer_config import have_transformer_engine


def build_training_model(recipe) -> list:
    """Build and wrap this pipeline stage's model for training.

    Takes the validated Recipe; megatron-core's parallel state must be initialised. Returns a
    one-element list (megatron-core's "model chunks") holding the model wrapped for training
    (see :func:`wrap_for_training`).
    """
    bf16 = recipe.train.precision == "bf16"
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    model = build_model(
        recipe.model,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel=resolved_parallel(recipe, world),
        bf16=bf16,
        recompute=recipe.train.recompute,
        cuda_graphs=recipe.train.cuda_graphs,
    )
    return wrap_for_training(model, bf16)


def resolved_parallel(recipe, world_size: int):
    """The recipe's ParallelConfig with ``pp_split: balanced`` turned into explicit
    ``pipeline_stage_layers`` (the planner's split for this world size); else unchanged."""
    parallel = recipe.parallel
    if parallel.pp_split != "balanced" or parallel.pipeline_stage_layers is not None:
        return parallel
    from hybrid_megatron.accounting.layout_plan import predict_layout, target_for

    return predict_layout(recipe, parallel, target_for(recipe, world_size)).parallel


def wrap_for_training(model, bf16: bool, fuse_wgrad: bool = True) -> list:
    """Wrap a megatron-core language model (ours or any other) the way the trainer trains it.

    Takes the unwrapped model (its ``config`` is a TransformerConfig), whether training runs
    in bf16 and whether Transformer Engine layers accumulate weight gradients straight into the
    fp32 gradient buffers (see :func:`fuse_wgrad_accumulation`; no effect without TE layers).
    Moves it to this rank's GPU when there is one, wraps it in Float16Module for bf16 and in
    megatron-core's DistributedDataParallel (fp32 gradient buffers, reduce-scatter for the
    distributed optimizer). Returns a one-element list of model chunks.
    """
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    config = model.config
    if bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=True,
        check_for_nan_in_grad=False,  # the loop skips non-finite steps itself and counts them
        bucket_size=None,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    ddp.broadcast_params()  # identical replicas across data-parallel ranks
    if fuse_wgrad:
        fuse_wgrad_accumulation(ddp)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return [ddp]


def fuse_wgrad_accumulation(ddp_model) -> int:
    """Make every Transformer Engine layer of a DDP-wrapped model write its weight gradients
    straight into megatron-core's fp32 gradient buffer (``param.main_grad``).

    Without it each TE layer returns a bf16 weight gradient per micro-batch and DDP's hook adds
    it into ``main_grad`` (one fp32 read-modify-write of every weight per micro-batch, about 5%
    of a 1B step). megatron-core switches this on through ``config.gradient_accumulation_fusion``
    at build time, but that flag also makes its own (non-TE) output layer demand apex's
    extension, which this stack does not ship; so the TE layers are switched here instead, once
    DDP has given every parameter its ``main_grad``. The config flag is set too, because
    megatron-core's CUDA-graph runner reads it to replay TE's ``grad_added_to_main_grad``
    marks (its runners are created on the first forward, after this).

    Takes the DDP-wrapped model (its ``config`` is the model's TransformerConfig); returns how
    many TE modules were switched (0 without Transformer Engine, e.g. on CPU).
    """
    if not have_transformer_engine():  # no TE layers to switch
        return 0
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    count = 0
    for module in ddp_model.modules():
        if isinstance(module, TransformerEngineBaseModule) and hasattr(module, "fuse_wgrad_accumulation"):
            module.fuse_wgrad_accumulation = True
            count += 1
    if count:
        ddp_model.config.gradient_accumulation_fusion = True
    return count


def captured_layer_graphs(model_chunks) -> int:
    """How many layers of the model chunks replay a captured CUDA graph (``train.cuda_graphs``).

    Takes the model chunks; returns the number of layers whose megatron-core graph manager holds
    a captured forward graph (0 before the end of the first step, and without graphs).
    """
    count = 0
    for chunk in model_chunks:
        for module in chunk.modules():
            manager = getattr(module, "cudagraph_manager", None)
            if manager is not None and any(r.fwd_graph is not None for r in manager.cudagraph_runners):
                count += 1
    return count


def unwrap(model_chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    inner = model_chunk
    while hasattr(inner, "module"):
        inner = inner.module
    return inner
