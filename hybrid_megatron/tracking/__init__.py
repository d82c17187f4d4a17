"""Experiment tracking (MLflow, rank 0 only)."""

from hybrid_megatron.tracking.mlflow_tracker import RunTracker, flatten

__all__ = ["RunTracker", "flatten"]
