"""The Trainer: a run set up from a validated Recipe, and its loop (:meth:`Trainer.fit`).

The loop only orders the components, each of which owns one concern: the Trainable (model,
optimizer, schedule, the step), the NaN policy, the step metrics (MoE expert load included) and
loss log, validation, checkpointing, tracking (MLflow) and the stop signal.
"""

from __future__ import annotations

import time

import torch

from hybrid_megatron.accounting import count_parameters
from hybrid_megatron.config.derived import derived, format_derived
from hybrid_megatron.logs import get_logger, log_rank0
from hybrid_megatron.tracking import RunTracker
from hybrid_megatron.training.checkpointing import Checkpointing
from hybrid_megatron.training.data import ResumableBatches, num_eval_samples, validation_batches
from hybrid_megatron.training.distributed import init_distributed_from_env
from hybrid_megatron.training.expert_load import ExpertLoad
from hybrid_megatron.training.loss_log import LossLog
from hybrid_megatron.training.metrics import StepMetrics
from hybrid_megatron.training.model_setup import build_training_model, captured_layer_graphs
from hybrid_megatron.training.nan_policy import NanPolicy
from hybrid_megatron.training.parallel_setup import setup_model_parallel
from hybrid_megatron.training.restore import init_weights_from
from hybrid_megatron.training.signals import GracefulStop
from hybrid_megatron.training.trainable import Trainable
from hybrid_megatron.training.validation import Validation

log = get_logger(__name__)


class Trainer:
    """One training run on this rank; every rank of the job builds one and calls :meth:`fit`.

    Building it joins the process group from the environment, checks the checkpoint directory
    and the data (tokenizer, vocabulary) before any model is built, builds the model chunks,
    optimizer and schedule, and resumes from the latest checkpoint (``checkpoint.resume``) or
    else starts from ``checkpoint.init_from``'s weights. Raises CheckpointError or the data
    tools' error naming the bad input.
    """

    def __init__(self, recipe):
        self.rank, world, _ = init_distributed_from_env()
        train = recipe.train
        reset_run_state()
        setup_model_parallel(recipe.parallel, train.seed, cuda_graphs=train.cuda_graphs)
        if train.deterministic:
            torch.use_deterministic_algorithms(True)
        info = derived(recipe, world, count_parameters)
        log_rank0(log, format_derived(info))
        self.recipe, self.total_steps, self.seq_length = recipe, info["total_steps"], recipe.data.seq_length
        self.checkpointing = Checkpointing(recipe.checkpoint, recipe.to_yaml())
        self.checkpointing.check_writable()
        train_ds, valid_ds, _ = _prepare_data(recipe, self.total_steps)

        model_chunks = build_training_model(recipe)
        resume = self.checkpointing.resume_path()
        if resume is None and recipe.checkpoint.init_from is not None:
            # before the optimizer exists: it copies the weights into its (bf16: fp32) main params
            init_weights_from(recipe.checkpoint.init_from, model_chunks, recipe.model)
            log_rank0(
                log, f"initialised weights from {recipe.checkpoint.init_from} (fresh optimizer, step 0)"
            )
        self.trainable = Trainable.build(model_chunks, train, self.total_steps)
        self.state = self.checkpointing.resume(resume, self.trainable)

        g, mbs = train.global_batch_size, train.micro_batch_size
        self.batches = ResumableBatches(train_ds, g, mbs, self.state.consumed_samples)
        self.metrics = StepMetrics(recipe, world)
        self.tracker = RunTracker(
            recipe, self.metrics.planned(recipe.model, self.total_steps), active=self.rank == 0
        )
        self.validation = Validation(
            validation_batches(valid_ds, g, mbs, train.eval_iters),
            train.eval_interval,
            self.seq_length,
            self.tracker,
        )
        self.expert_load = ExpertLoad(
            self.trainable.model_chunks, train.log_interval, recipe.parallel.sequence_parallel
        )
        self.loss_log = LossLog(recipe.run_dir, train.log_interval, self.total_steps, active=self.rank == 0)
        self.nan_policy = NanPolicy(train.max_consecutive_nan_skips)
        self.graphs_to_report = train.cuda_graphs  # logged once, after this run's first step

    def fit(self) -> dict:
        """Train to the recipe's total steps, or until a stop signal (SIGTERM/SIGUSR1: save,
        then hand over to the previous handler, e.g. submitit's requeue). Returns the summary
        (see :func:`hybrid_megatron.training.entry.train`). Raises TrainingAborted (NaN policy)."""
        state, trainable, tracker = self.state, self.trainable, self.tracker
        stop = GracefulStop().install()
        loss, status = None, "FAILED"
        try:
            while state.step < self.total_steps and not stop.agreed():  # all ranks stop after one step
                t0 = time.perf_counter()
                lr = trainable.lr  # what this step's update uses (set by the scheduler)
                loss, grad_norm, applied = trainable.step(self.batches.next_global_batch(), self.seq_length)
                state.step += 1
                state.consumed_samples = self.batches.consumed
                self.nan_policy.record(state, loss, applied)
                metrics = self.metrics.of_step(state, loss, lr, grad_norm, time.perf_counter() - t0)
                metrics.update(self.expert_load.of_step(state.step))
                tracker.log_metrics(metrics, state.step)
                if self.loss_log.record(state.step, metrics):
                    tracker.flush()
                self._report_cuda_graphs(state.step)
                self.validation.after_step(trainable.model_chunks, state.step)
                self.checkpointing.after_step(trainable, state)
            self.validation.at_end(trainable.model_chunks, state.step)
            self.checkpointing.at_exit(trainable, state)
            status = "KILLED" if stop.stopping else "FINISHED"
        finally:
            tracker.finish(status)
        summary = self._summary(loss, stop)
        if stop.requested:
            stop.hand_over()  # e.g. submitit's handler: requeue the job, which resumes from the save
        else:
            stop.restore()
        return summary

    def _report_cuda_graphs(self, step: int) -> None:
        # megatron-core records each layer in the first step and captures at its end.
        if self.graphs_to_report:
            log_rank0(
                log,
                f"step {step}: CUDA graphs captured for "
                f"{captured_layer_graphs(self.trainable.model_chunks)} layers",
            )
            self.graphs_to_report = False

    def _summary(self, loss, stop: GracefulStop) -> dict:
        """The run's summary; logs its ``done:`` line (the launcher and tests read it)."""
        recipe, tracker, last = self.recipe, self.tracker, self.checkpointing.last_saved
        summary = {
            "checkpoint_dir": recipe.checkpoint.dir,
            "last_checkpoint": str(last) if last else None,
            "final_loss": loss,
            "final_val_loss": self.validation.loss,
            "steps": self.state.step,
            "skipped_steps": self.state.skipped_steps,
            "stopped_by_signal": stop.received,
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": recipe.tracking_uri() if tracker.active else None,
        }
        log_rank0(
            log,
            f"done: {self.state.step} steps, final loss {loss}, checkpoint {summary['last_checkpoint']}"
            + (f", MLflow run {tracker.run_id} at {recipe.tracking_uri()}" if tracker.run_id else ""),
        )
        return summary


def _prepare_data(recipe, total_steps: int):
    """Datasets for the run, validated before any model is built (raises with the bad input)."""
    from hybrid_megatron.data.datasets import build_gpt_datasets

    g = recipe.train.global_batch_size
    eval_samples = num_eval_samples(recipe.train.eval_iters, recipe.train.eval_interval, total_steps, g)
    return build_gpt_datasets(
        recipe.data,
        [total_steps * g, eval_samples or None, None],
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
