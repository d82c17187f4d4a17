"""MLflow logging of a training run: params, tags, batched metrics, artifacts (rank 0 only).

Tracking never costs a training run: every call goes through the run's spool
(`hybrid_megatron.tracking.spool`) and is sent from there with short request limits. While the
store does not answer, records stay in ``<run dir>/mlflow_spool/`` and sending is retried at
most every ``RETRY_INTERVAL_S``; what is left at the end is sent by
``python -m hybrid_megatron.tracking sync RUN_DIR``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hybrid_megatron.logs import get_logger
from hybrid_megatron.tracking.spool import MAX_METRICS, MAX_PARAMS, Spool
from hybrid_megatron.tracking.store import failure_reason, short_requests
from hybrid_megatron.tracking.tags import TAG_GROUP, TAG_KIND, TAG_MATCH, TAG_SCALE, TAG_VARIANT

RUN_ID_FILE = "mlflow_run_id"
RETRY_INTERVAL_S = 30.0  # between tries while the store does not answer
SEND_BUDGET_S = 5.0  # of sending per flush when a backlog goes out (the rest at the next flush)
SYSTEM_INTERVAL_S = 10.0  # between samples of CPU/GPU/memory

log = get_logger(__name__)


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


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunTracker:
    """One MLflow run per training run; a resumed run continues the same MLflow run.

    Args:
        recipe: the validated Recipe (params, tags, tracking settings).
        planned: planned totals logged as params (``model.num_parameters``,
            ``model.active_parameters``, ``train.tokens``, ``train.flops``).
        active: False on every rank but 0 (then every method is a no-op).

    ``run_id`` is the MLflow run id, None until the store has created the run (a store that
    did not answer at the start).
    """

    def __init__(self, recipe, planned: dict, active: bool):
        self.active = active and recipe.tracking.enabled
        self._pending: list[list] = []
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._retry_at = 0.0
        self._failing = False
        if not self.active:
            return
        cfg = recipe.tracking
        self.run_dir = recipe.run_dir
        self.spool = Spool(
            recipe.run_dir, recipe.tracking_uri(), cfg.experiment, Path(recipe.checkpoint.dir) / RUN_ID_FILE
        )
        self._system = _SystemSampler()
        if self.spool.run_id is None and not self.spool.create_pending():
            tags = {
                TAG_KIND: recipe.model.kind,
                TAG_SCALE: cfg.scale or "",
                TAG_GROUP: cfg.compare_group or "",
                TAG_MATCH: cfg.match or "",
                TAG_VARIANT: cfg.variant or "",
                **cfg.tags,
            }
            params = flatten(recipe.to_dict())
            params.update({k: str(v) for k, v in planned.items() if v is not None})
            items = list(params.items())
            self.spool.append(
                [
                    {
                        "op": "create_run",
                        "run_name": cfg.run_name or recipe.name,
                        "tags": tags,
                        "start_time": _now_ms(),
                    },
                    *(
                        {"op": "log_batch", "params": dict(items[i : i + MAX_PARAMS])}
                        for i in range(0, len(items), MAX_PARAMS)
                    ),
                    {"op": "log_text", "path": "recipe.yaml", "text": recipe.to_yaml()},
                ]
            )
        else:
            self.spool.append([{"op": "set_status", "status": "RUNNING", "time": _now_ms()}])
        self._send(force=True)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (None while inactive or before the store created the run)."""
        return self.spool.run_id if self.active else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics for ``step``; they are sent in batches by :meth:`flush`."""
        if not self.active:
            return
        now = _now_ms()
        for key, value in metrics.items():
            if value is None:
                continue
            self._pending.append([key, float(value), now, step])
            self.history.setdefault(key, []).append((step, float(value)))

    def flush(self) -> None:
        """Spool the queued metrics (and a system-metrics sample every ``SYSTEM_INTERVAL_S``),
        then send what the store has not taken yet, unless it failed within the retry interval."""
        if not self.active:
            return
        if self._pending:
            self._system.sample_into(self._pending, self._pending[-1][3])
        pending, self._pending = self._pending, []
        self.spool.append(
            {"op": "log_batch", "metrics": pending[i : i + MAX_METRICS]}
            for i in range(0, len(pending), MAX_METRICS)
        )
        self._send()

    def finish(self, status: str = "FINISHED") -> None:
        """Flush, attach the loss-curve PNG, end the run with ``status`` and send everything
        (one try); what the store did not take stays in the spool for ``sync``."""
        if not self.active:
            return
        self.flush()
        try:
            self._save_loss_curve(self.spool.dir / "loss_curve.png")
            self.spool.append([{"op": "log_artifact", "file": "loss_curve.png"}])
        finally:
            self.spool.append([{"op": "set_status", "status": status, "time": _now_ms()}])
            self._send(force=True)
            left = len(self.spool.unsent())
            if left:
                log.warning(
                    f"tracking: {left} records for {self.spool.uri} kept in {self.spool.dir}; send "
                    f"them once it answers: python -m hybrid_megatron.tracking sync {self.run_dir}"
                )

    def _send(self, force: bool = False) -> None:
        """Send the spool's unsent records; never raises. After a failure, waits
        ``RETRY_INTERVAL_S`` before the next try (``force``: try now, without a time budget)."""
        now = time.monotonic()
        if not force and now < self._retry_at:
            return
        try:
            with short_requests():
                sent = self.spool.send(deadline=None if force else now + SEND_BUDGET_S)
        except Exception as err:  # whatever the store raises: training goes on
            self._retry_at = now + RETRY_INTERVAL_S
            if not self._failing:
                log.warning(
                    f"tracking: {self.spool.uri} did not take the run's records ({failure_reason(err)}); "
                    f"training goes on, records kept in {self.spool.dir} and retried every "
                    f"{RETRY_INTERVAL_S:g} s"
                )
            self._failing = True
            return
        self._retry_at = 0.0
        if self._failing:
            log.warning(f"tracking: {self.spool.uri} answers again; sent {sent} kept records")
            self._failing = False

    def _save_loss_curve(self, path: Path) -> None:
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
        fig.savefig(path)
        plt.close(fig)


class _SystemSampler:
    """CPU, memory, disk, network (and NVIDIA GPU) use through MLflow's system-metrics monitors,
    sampled on the training thread so the samples go through the spool like every metric."""

    def __init__(self) -> None:
        self._last = -float("inf")
        try:
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
            from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

            self.monitors: list = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        except ImportError:  # psutil missing: no system metrics
            self.monitors = []
            return
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except Exception:  # no NVIDIA driver / pynvml: CPU-side metrics only
            pass

    def sample_into(self, out: list[list], step: int) -> None:
        """Append ``[system/<name>, value, time, step]`` rows, at most every SYSTEM_INTERVAL_S."""
        now = time.monotonic()
        if not self.monitors or now - self._last < SYSTEM_INTERVAL_S:
            return
        self._last = now
        stamp = _now_ms()
        for monitor in self.monitors:
            monitor.collect_metrics()
            for name, value in monitor.aggregate_metrics().items():
                out.append([f"system/{name}", float(value), stamp, step])
            monitor.clear_metrics()
