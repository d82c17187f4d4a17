"""MLflow logging of a training run: params, tags, batched metrics, artifacts (rank 0 only)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

RUN_ID_FILE = "mlflow_run_id"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts/lists into ``a.b.0.c`` keys with string values (MLflow params)."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(tree)
    return out


class RunTracker:
    """One MLflow run per training run; a resumed run continues the same MLflow run.

    Args:
        recipe: the validated Recipe (params, tags, tracking settings).
        planned: planned totals logged as params (``model.num_parameters``,
            ``model.active_parameters``, ``train.tokens``, ``train.flops``).
        active: False on every rank but 0 (then every method is a no-op).
    """

    def __init__(self, recipe, planned: dict, active: bool):
        self.active = active and recipe.tracking.enabled
        self.run_id: str | None = None
        self._pending: list = []
        self.history: dict[str, list[tuple[int, float]]] = {}
        if not self.active:
            return
        import mlflow

        self._mlflow = mlflow
        cfg = recipe.tracking
        # CPU/GPU/memory every 10 s, sent every sample: tiny runs get a few points too.
        mlflow.set_system_metrics_sampling_interval(10)
        mlflow.set_system_metrics_samples_before_logging(1)
        mlflow.set_tracking_uri(recipe.tracking_uri())
        mlflow.set_experiment(cfg.experiment)
        id_file = Path(recipe.checkpoint.dir) / RUN_ID_FILE
        resume_id = id_file.read_text().strip() if id_file.exists() else None
        tags = {
            "hm.kind": recipe.model.kind,
            "hm.scale": cfg.scale or "",
            "hm.compare_group": cfg.compare_group or "",
            "hm.match": cfg.match or "",
            **cfg.tags,
        }
        self._run = mlflow.start_run(
            run_id=resume_id,
            run_name=None if resume_id else (cfg.run_name or recipe.name),
            tags=tags,
            log_system_metrics=True,
        )
        self.run_id = self._run.info.run_id
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id)
        if resume_id is None:
            params = flatten(recipe.to_dict())
            params.update({k: str(v) for k, v in planned.items() if v is not None})
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow's per-call parameter limit
                mlflow.log_params(dict(items[i : i + 100]))
            mlflow.log_text(recipe.to_yaml(), "recipe.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics for ``step``; they are sent in batches by :meth:`flush`."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            self._pending.append(Metric(key, float(value), now, step))
            self.history.setdefault(key, []).append((step, float(value)))

    def flush(self) -> None:
        """Send queued metrics in one request."""
        if not self.active or not self._pending:
            return
        assert self.run_id is not None  # an active tracker has started its run
        self._mlflow.tracking.MlflowClient().log_batch(self.run_id, metrics=self._pending)
        self._pending = []

    def finish(self, status: str = "FINISHED") -> None:
        """Flush, attach the loss-curve PNG and end the run with ``status``."""
        if not self.active:
            return
        self.flush()
        try:
            self._log_loss_curve()
        finally:
            self._mlflow.end_run(status=status)

    def _log_loss_curve(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("train/loss", "val/loss"):
            points = self.history.get(key)
            if points:
                ax.plot(*zip(*points), label=key, marker="o" if key == "val/loss" else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        self._mlflow.log_figure(fig, "loss_curve.png")
        plt.close(fig)
