"""``train(recipe)``: the job every rank runs (launch/slurm.py calls it)."""

from __future__ import annotations

from hybrid_megatron.training.trainer import Trainer


def train(recipe) -> dict:
    """Train ``recipe`` on this rank; every rank of the job calls it.

    Takes a validated Recipe. Joins the process group from the environment, checks data,
    tokenizer and checkpoint directory before building anything, resumes from the latest
    checkpoint (``checkpoint.resume``) or else starts from ``checkpoint.init_from``'s weights,
    trains with megatron-core's schedules and distributed optimizer, validates, checkpoints,
    logs to MLflow (rank 0), and on SIGTERM/SIGUSR1 saves and stops (see
    :class:`~hybrid_megatron.training.trainer.Trainer`). Returns a summary dict:
    ``checkpoint_dir``, ``last_checkpoint``, ``final_loss``, ``final_val_loss``, ``steps``,
    ``skipped_steps``, ``stopped_by_signal``, ``mlflow_run_id``, ``tracking_uri``. Raises
    TrainingAborted, CheckpointError or the data tools' error naming the bad input.
    """
    return Trainer(recipe).fit()
