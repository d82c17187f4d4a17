"""``train(recipe)``: the job every rank runs (launch/slurm.py calls it)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_megatron.accounting import count_params
from hybrid_megatron.checkpoint_layout import is_checkpoint_root, latest_checkpoint
from hybrid_megatron.config.derived import derived, format_derived
from hybrid_megatron.logs import get_logger, log_rank0
from hybrid_megatron.training.checkpoint import (
    CheckpointError,
    TrainingState,
    check_writable,
    load_checkpoint,
    save_checkpoint,
)
from hybrid_megatron.training.data import ResumableBatches, num_eval_samples, validation_batches
from hybrid_megatron.training.distributed import init_distributed_from_env
from hybrid_megatron.training.metrics import flops_per_token, memory_gib, peak_flops_per_gpu
from hybrid_megatron.training.model_setup import build_training_model, captured_layer_graphs
from hybrid_megatron.training.optimizer import build_optimizer, build_scheduler
from hybrid_megatron.training.parallel_setup import setup_model_parallel
from hybrid_megatron.training.signals import GracefulStop
from hybrid_megatron.training.step import evaluate, train_step

LOSS_LOG = "train_log.jsonl"

log = get_logger(__name__)


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite losses in a row); names the step."""


def _resume_path(recipe):
    choice = recipe.checkpoint.resume
    if choice == "none":
        return None
    if choice == "auto":
        return latest_checkpoint(recipe.checkpoint.dir)
    path = Path(choice)
    if path.name != "" and is_checkpoint_root(path):
        return latest_checkpoint(path)
    return path


def _prepare_data(recipe, info: dict):
    """Datasets for the run, validated before any model is built (raises with the bad input)."""
    from hybrid_megatron.data.datasets import build_gpt_datasets

    g = recipe.train.global_batch_size
    train_samples = info["total_steps"] * g
    eval_samples = num_eval_samples(
        recipe.train.eval_iters, recipe.train.eval_interval, info["total_steps"], g
    )
    return build_gpt_datasets(
        recipe.data,
        [train_samples, eval_samples or None, None],
        model_vocab_size=recipe.model.vocab_size,
    )


def reset_run_state() -> None:
    """Forget megatron-core's run-global state (takes and returns nothing); see below."""
    # megatron-core keeps two pieces of MoE state in module globals, both sized by whatever ran
    # first in the process: the aux-loss gradient scale (a backward outside the schedules makes
    # it shape [], the schedules then copy a [1]-shaped scale into it and fail) and the
    # per-layer aux-loss tracker (sized by the first model's layer count). Both belong to one
    # run, so each run starts without them.
    from megatron.core.transformer.moe import moe_utils

    moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None
    moe_utils.get_moe_layer_wise_logging_tracker().clear()
    # Per-layer CUDA graphs (train.cuda_graphs): the record of captured graphs is process-global
    # too; a later model in the same process must record and capture its own.
    if torch.cuda.is_available():
        from megatron.core.transformer.cuda_graphs import delete_cuda_graphs

        delete_cuda_graphs()


def train(recipe) -> dict:
    """Train ``recipe`` on this rank; every rank of the job calls it.

    Takes a validated Recipe. Joins the process group from the environment, checks data,
    tokenizer and checkpoint directory before building anything, resumes from the latest
    checkpoint (``checkpoint.resume``) or else starts from ``checkpoint.init_from``'s weights,
    trains with megatron-core's schedules and distributed optimizer, validates, checkpoints, logs to MLflow (rank 0), and on SIGTERM/SIGUSR1 saves
    and stops. Returns a summary dict: ``checkpoint_dir``, ``last_checkpoint``, ``final_loss``,
    ``final_val_loss``, ``steps``, ``skipped_steps``, ``stopped_by_signal``, ``mlflow_run_id``.
    Raises TrainingAborted, CheckpointError or the data tools' error naming the bad input.
    """
    rank, world, _ = init_distributed_from_env()
    train_cfg = recipe.train
    reset_run_state()
    setup_model_parallel(recipe.parallel, train_cfg.seed, cuda_graphs=train_cfg.cuda_graphs)
    if train_cfg.deterministic:
        torch.use_deterministic_algorithms(True)

    info = derived(recipe, world, count_params)
    log_rank0(log, format_derived(info))
    check_writable(recipe.checkpoint.dir)
    train_ds, valid_ds, _ = _prepare_data(recipe, info)

    model_chunks = build_training_model(recipe)
    resume = _resume_path(recipe)
    if resume is None and recipe.checkpoint.init_from is not None:
        # before the optimizer exists: it copies the weights into its (bf16: fp32) main params
        from hybrid_megatron.training.restore import init_weights_from

        init_weights_from(recipe.checkpoint.init_from, model_chunks, recipe.model)
        log_rank0(log, f"initialised weights from {recipe.checkpoint.init_from} (fresh optimizer, step 0)")
    optimizer = build_optimizer(train_cfg, model_chunks)
    total_steps = info["total_steps"]
    scheduler = build_scheduler(train_cfg, optimizer, total_steps)

    state = TrainingState()
    if resume is not None:
        state = load_checkpoint(resume, model_chunks, optimizer, scheduler)
        log_rank0(log, f"resumed from {resume} at step {state.step}")

    seq = recipe.data.seq_length
    g = train_cfg.global_batch_size
    batches = ResumableBatches(train_ds, g, train_cfg.micro_batch_size, state.consumed_samples)
    valid = validation_batches(valid_ds, g, train_cfg.micro_batch_size, train_cfg.eval_iters)
    tokens_per_step = g * seq
    flops_tok = flops_per_token(recipe.model, seq)
    peak = peak_flops_per_gpu("fp8" if recipe.model.fp8 else train_cfg.precision)

    from hybrid_megatron.tracking import RunTracker

    from hybrid_megatron.accounting import count_parameters

    params = count_parameters(recipe.model)
    planned = {
        "model.num_parameters": params.total,
        "model.active_parameters": params.active,
        "train.tokens": total_steps * tokens_per_step,
        "train.flops": flops_tok * total_steps * tokens_per_step,
    }
    tracker = RunTracker(recipe, planned, active=rank == 0)
    stop = GracefulStop().install()
    loss_log = Path(recipe.run_dir) / LOSS_LOG
    loss = val_loss = None
    graphs_to_report = train_cfg.cuda_graphs  # logged once, after this run's first step
    last_saved = resume
    status = "FAILED"
    try:
        while state.step < total_steps and not stop.agreed():  # all ranks stop after one step
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]  # what this step's update uses (set by the scheduler)
            loss, grad_norm, applied = train_step(
                model_chunks, optimizer, scheduler, batches.next_global_batch(), seq
            )
            state.step += 1
            state.consumed_samples = batches.consumed
            if applied:
                state.consecutive_nan_skips = 0
            else:
                state.skipped_steps += 1
                state.consecutive_nan_skips += 1
                log_rank0(log, f"step {state.step}: non-finite loss {loss}; update skipped "
                               f"({state.consecutive_nan_skips} in a row)")
                if state.consecutive_nan_skips >= train_cfg.max_consecutive_nan_skips:
                    raise TrainingAborted(
                        f"step {state.step}: {state.consecutive_nan_skips} non-finite losses in a "
                        f"row (train.max_consecutive_nan_skips={train_cfg.max_consecutive_nan_skips})"
                    )
            elapsed = time.perf_counter() - t0
            tokens_per_s = tokens_per_step / elapsed
            mfu = flops_tok * tokens_per_s / (peak * world) if peak else None
            metrics = {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": None if grad_norm is None else float(grad_norm),
                "train/tokens_per_s": tokens_per_s,
                "train/mfu": mfu,
                "train/tokens_seen": state.consumed_samples * seq,
                "train/flops_seen": flops_tok * state.consumed_samples * seq,
                "train/memory_gib": memory_gib(),
                "train/skipped_steps": state.skipped_steps,
            }
            tracker.log_metrics(metrics, state.step)
            if rank == 0:
                with loss_log.open("a") as f:  # exact per-step record (resume checks read it)
                    f.write(json.dumps({"step": state.step, "loss": loss.hex() if isinstance(loss, float) else loss,
                                        "tokens_per_s": tokens_per_s, "mfu": mfu}) + "\n")
            if state.step % train_cfg.log_interval == 0 or state.step == 1:
                log_rank0(log, f"step {state.step}/{total_steps} loss {loss:.4f} lr {metrics['train/lr']:.2e} "
                               f"grad_norm {metrics['train/grad_norm'] or float('nan'):.3f} "
                               f"tokens/s {tokens_per_s:,.0f}" + (f" mfu {mfu:.1%}" if mfu else "")
                               + f" mem {metrics['train/memory_gib']:.2f}GiB")
                tracker.flush()
            if graphs_to_report:
                # megatron-core records each layer in the first step and captures at its end.
                log_rank0(log, f"step {state.step}: CUDA graphs captured for "
                               f"{captured_layer_graphs(model_chunks)} layers")
                graphs_to_report = False
            if valid and train_cfg.eval_interval and state.step % train_cfg.eval_interval == 0:
                val_loss = evaluate(model_chunks, valid, seq)
                tracker.log_metrics({"val/loss": val_loss}, state.step)
                log_rank0(log, f"step {state.step}: validation loss {val_loss:.4f}")
            if state.step % recipe.checkpoint.interval == 0:
                last_saved = save_checkpoint(recipe.checkpoint.dir, model_chunks, optimizer,
                                             scheduler, state, recipe.checkpoint.keep_last, recipe.to_yaml())
                log_rank0(log, f"saved checkpoint {last_saved}")
        if valid and (val_loss is None or state.step % max(train_cfg.eval_interval, 1)):
            val_loss = evaluate(model_chunks, valid, seq)
            tracker.log_metrics({"val/loss": val_loss}, state.step)
        finished_at_save = last_saved is not None and Path(last_saved).name.endswith(f"{state.step:08d}")
        if recipe.checkpoint.save_on_exit and not finished_at_save:
            last_saved = save_checkpoint(recipe.checkpoint.dir, model_chunks, optimizer, scheduler,
                                         state, recipe.checkpoint.keep_last, recipe.to_yaml())
            log_rank0(log, f"saved checkpoint {last_saved}")
        status = "KILLED" if stop.stopping else "FINISHED"
    finally:
        tracker.finish(status)
    summary = {
        "checkpoint_dir": recipe.checkpoint.dir,
        "last_checkpoint": str(last_saved) if last_saved else None,
        "final_loss": loss,
        "final_val_loss": val_loss,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "stopped_by_signal": stop.received,
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": recipe.tracking_uri() if tracker.active else None,
    }
    log_rank0(log, f"done: {state.step} steps, final loss {loss}, checkpoint {summary['last_checkpoint']}"
                   + (f", MLflow run {tracker.run_id} at {recipe.tracking_uri()}" if tracker.run_id else ""))
    if stop.requested:
        stop.hand_over()  # e.g. submitit's handler: requeue the job, which resumes from the save
    else:
        stop.restore()
    return summary
