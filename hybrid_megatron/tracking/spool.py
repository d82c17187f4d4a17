"""The run's MLflow calls as an append-only journal in ``<run dir>/mlflow_spool/``, sent in order.

Every call the tracker makes (create the run, log params/tags/metrics, an artifact, set the
status) is first appended to ``records.jsonl`` (one JSON object a line), then sent from the
byte offset in ``sent``, which moves past each record the store has taken. A tracking outage
leaves the records there: they go out when the store answers again, or by
``python -m hybrid_megatron.tracking sync RUN_DIR``. ``store.json`` names the store, the
experiment and the run-id file; records the store refuses for good (an invalid value) are
moved to ``rejected.jsonl`` with the store's reason, so one bad record cannot block the rest.

Resending after a crash between a send and the offset update is harmless: MLflow keeps one
copy of an identical metric, params and tags are set to the same value, and the run is created
only while its run-id file does not exist.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hybrid_megatron.errors import InputError
from hybrid_megatron.tracking.store import open_store

SPOOL_DIR = "mlflow_spool"
RECORDS, SENT, STORE, REJECTED = "records.jsonl", "sent", "store.json", "rejected.jsonl"
# MLflow's limits per log_batch request.
MAX_METRICS, MAX_PARAMS = 1000, 100
# Error codes of a request the store will never take (resending cannot help).
REFUSED_FOR_GOOD = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


class NoSpoolError(InputError):
    """A run directory without a tracking spool."""


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Spool:
    """The journal of one run's MLflow calls (see the module docstring).

    Args:
        run_dir: the run directory; the spool is its ``mlflow_spool/`` folder.
        uri, experiment, run_id_file: the store, the experiment and the file holding the
            MLflow run id (the trainer's ``<checkpoint dir>/mlflow_run_id``); given by the
            tracker (saved in ``store.json``), left out by ``sync`` (read from there).
    """

    def __init__(
        self,
        run_dir: str | Path,
        uri: str | None = None,
        experiment: str | None = None,
        run_id_file: str | Path | None = None,
    ):
        self.dir = Path(run_dir) / SPOOL_DIR
        if uri is None:
            if not (self.dir / STORE).is_file():
                raise NoSpoolError(f"{run_dir}: no tracking spool ({self.dir / STORE} does not exist)")
            saved = json.loads((self.dir / STORE).read_text())
            uri, experiment, run_id_file = saved["uri"], saved["experiment"], saved["run_id_file"]
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            id_file = str(Path(run_id_file or "").resolve())
            store = {"uri": uri, "experiment": experiment, "run_id_file": id_file}
            _atomic_write(self.dir / STORE, json.dumps(store, indent=1) + "\n")
        self.uri, self.experiment = uri, str(experiment)
        self.run_id_file = Path(str(run_id_file))
        self._client: Any = None
        self._experiment_id: str | None = None
        self._drop_torn_tail()

    # ---- the journal ------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once the run exists in the store, else None."""
        if not self.run_id_file.exists():
            return None
        return self.run_id_file.read_text().strip() or None

    def append(self, records: Iterable[dict]) -> None:
        """Append records (one JSON line each) and flush them to the file."""
        lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        if lines:
            with open(self.dir / RECORDS, "a") as f:
                f.write(lines)
                f.flush()

    def sent_offset(self) -> int:
        """Bytes of ``records.jsonl`` the store has taken."""
        path = self.dir / SENT
        return int(path.read_text()) if path.exists() else 0

    def unsent(self) -> list[tuple[int, dict]]:
        """The records not yet sent, in order, each with the offset just past it."""
        path = self.dir / RECORDS
        if not path.exists():
            return []
        out, offset = [], self.sent_offset()
        with open(path, "rb") as f:
            f.seek(offset)
            for line in f:
                offset += len(line)
                out.append((offset, json.loads(line)))
        return out

    def create_pending(self) -> bool:
        """Whether a ``create_run`` record waits to be sent."""
        return any(r["op"] == "create_run" for _, r in self.unsent())

    def _drop_torn_tail(self) -> None:
        # A process killed mid-append leaves a line without its newline; it was never sent.
        path = self.dir / RECORDS
        if not path.exists() or path.stat().st_size == 0:
            return
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    # ---- sending ----------------------------------------------------------------------------

    def send(self, deadline: float | None = None) -> int:
        """Send the unsent records in order, moving ``sent`` past each one the store took.

        Stops at ``deadline`` (``time.monotonic()``), if given, after at least one request.
        Returns the number of records sent. Raises the first error that may pass (the store
        does not answer); records the store refuses for good go to ``rejected.jsonl``.
        """
        from mlflow.exceptions import MlflowException

        sent = 0
        for end, group in _batches(self.unsent()):
            try:
                self._apply(group)
            except MlflowException as err:
                if err.error_code not in REFUSED_FOR_GOOD:
                    raise
                with open(self.dir / REJECTED, "a") as f:
                    for record in group:
                        f.write(json.dumps({**record, "reason": str(err)}) + "\n")
            _atomic_write(self.dir / SENT, str(end))
            sent += len(group)
            if deadline is not None and time.monotonic() >= deadline:
                break
        return sent

    def _store(self) -> tuple[Any, str]:
        if self._client is None:
            self._client, self._experiment_id = open_store(self.uri, self.experiment)
        assert self._experiment_id is not None
        return self._client, self._experiment_id

    def _apply(self, group: list[dict]) -> None:
        """Send one record, or consecutive metrics-only records as one request."""
        from mlflow.entities import Metric, Param, RunTag

        client, experiment_id = self._store()
        record = group[0]
        op = record["op"]
        if op == "create_run":
            if self.run_id is None:  # else created before a crash kept ``sent`` from moving
                run = client.create_run(
                    experiment_id,
                    start_time=record["start_time"],
                    tags=record["tags"],
                    run_name=record["run_name"],
                )
                self.run_id_file.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(self.run_id_file, run.info.run_id)
            return
        run_id = self.run_id
        if run_id is None:
            raise InputError(f"{self.run_id_file}: missing; the spool's records have no MLflow run")
        if op == "log_batch":
            client.log_batch(
                run_id,
                metrics=[Metric(k, v, t, s) for r in group for k, v, t, s in r.get("metrics", [])],
                params=[Param(k, v) for k, v in record.get("params", {}).items()],
                tags=[RunTag(k, v) for k, v in record.get("tags", {}).items()],
            )
        elif op == "log_text":
            client.log_text(run_id, record["text"], record["path"])
        elif op == "log_artifact":
            client.log_artifact(run_id, str(self.dir / record["file"]))
        elif op == "set_status":
            if record["status"] == "RUNNING":
                client.update_run(run_id, status="RUNNING")
            else:
                client.set_terminated(run_id, status=record["status"], end_time=record["time"])
        else:
            raise ValueError(f"{self.dir / RECORDS}: unknown record op {op!r}")


def _metrics_only(record: dict) -> bool:
    return record["op"] == "log_batch" and not record.get("params") and not record.get("tags")


def _batches(unsent: list[tuple[int, dict]]) -> Iterable[tuple[int, list[dict]]]:
    """Group consecutive metrics-only records up to MLflow's per-request metric limit; every
    other record alone. Yields (offset past the group, records)."""
    group: list[dict] = []
    size, end = 0, 0
    for offset, record in unsent:
        n = len(record.get("metrics", []))
        if group and (not _metrics_only(record) or size + n > MAX_METRICS):
            yield end, group
            group, size = [], 0
        group.append(record)
        size, end = size + n, offset
        if not _metrics_only(record):
            yield end, group
            group, size = [], 0
    if group:
        yield end, group
