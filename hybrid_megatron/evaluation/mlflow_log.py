"""Log evaluation results to the MLflow run of the checkpoint's training run.

The run id is in ``<checkpoint root>/mlflow_run_id`` (written by the trainer's tracker); the
tracking URI defaults to the recipe's (``sqlite:///<parent of the run dir>/mlruns.db``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hybrid_megatron.checkpoint_layout import checkpoint_root
from hybrid_megatron.tracking.mlflow_tracker import RUN_ID_FILE


def log_results(
    checkpoint: str | Path,
    recipe,
    metrics: dict[str, float],
    artifacts: Sequence[str | Path] = (),
    tracking_uri: str | None = None,
    step: int | None = None,
) -> str | None:
    """Log ``metrics`` (name -> number) and ``artifacts`` (files) to the checkpoint's run.

    Returns the run id, or None (nothing logged) when the checkpoint has no ``mlflow_run_id``
    (training ran with tracking disabled).
    """
    id_file = checkpoint_root(checkpoint) / RUN_ID_FILE
    if not id_file.exists():
        return None
    run_id = id_file.read_text().strip()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or recipe.tracking_uri())
    for name, value in metrics.items():
        if value is not None:
            client.log_metric(run_id, name, float(value), step=step or 0)
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
    return run_id
