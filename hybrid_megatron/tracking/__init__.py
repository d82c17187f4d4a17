"""Experiment tracking (MLflow, rank 0 only): the run tracker, its spool, safe store opening."""

from hybrid_megatron.tracking.mlflow_tracker import RunTracker, flatten

__all__ = ["RunTracker", "flatten"]
