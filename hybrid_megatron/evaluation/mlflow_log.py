"""Log evaluation results to the MLflow run of the checkpoint's training run.

The run id is in ``<checkpoint root>/mlflow_run_id`` (written by the trainer's tracker); the
tracking URI defaults to the recipe's (``sqlite:///<parent of the run dir>/mlruns.db``). The
store is opened under its lock, as the trainer's tracker opens it, so evaluations started
together (or before any training run has opened a fresh store) do not race its creation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hybrid_megatron.checkpoint_layout import checkpoint_root
from hybrid_megatron.errors import InputError
from hybrid_megatron.tracking.mlflow_tracker import RUN_ID_FILE
from hybrid_megatron.tracking.store import open_client


class RunNotInStoreError(InputError):
    """The checkpoint's ``mlflow_run_id`` names a run the tracking store does not hold."""


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
    (training ran with tracking disabled). Raises RunNotInStoreError naming the id file and the store
    when the store has no such run (nothing logged).
    """
    id_file = checkpoint_root(checkpoint) / RUN_ID_FILE
    if not id_file.exists():
        return None
    run_id = id_file.read_text().strip()
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or recipe.tracking_uri()
    client = open_client(uri)
    try:
        client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RunNotInStoreError(
            f"{id_file}: names MLflow run {run_id}, which the tracking store {uri} does not hold"
        ) from None
    for name, value in metrics.items():
        if value is not None:
            client.log_metric(run_id, name, float(value), step=step or 0)
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
    return run_id
