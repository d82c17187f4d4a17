"""Opening an MLflow store safely: a quick reachability probe of a tracking server, a file lock
around the creation of a SQLite store, short request limits for calls that must not stall.

MLflow creates and migrates a SQLite store's schema the first time a client opens it; processes
doing that at once fail ("duplicate column name"), so every opener takes ``<db>.lock`` first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hybrid_megatron.errors import InputError

SQLITE_PREFIX = "sqlite:///"
PROBE_TIMEOUT_S = 3.0
# Per-request limits of the tracker's calls: one try, a few seconds (MLflow's defaults retry
# for minutes, which would stall a training step).
SHORT_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


class TrackingServerError(InputError):
    """The recipe's tracking server does not answer."""


def is_server(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (``http://`` or ``https://``)."""
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for any other store."""
    return Path(uri[len(SQLITE_PREFIX) :]) if uri.startswith(SQLITE_PREFIX) else None


def check_reachable(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise TrackingServerError unless the server at ``uri`` answers within ``timeout_s``.

    Probes ``<uri>/health`` once: any HTTP answer below 500 counts (a 401 or 404 still means a
    server is there); refused or timed-out connections and gateway errors do not. Stores that
    are not servers (SQLite, files) are not probed.
    """
    if not is_server(uri):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return
        reason = f"HTTP {err.code} {err.reason}"
    except (urllib.error.URLError, OSError) as err:
        cause = getattr(err, "reason", err)
        if isinstance(cause, TimeoutError):
            reason = f"no answer within {timeout_s:g} s"
        else:
            reason = (getattr(cause, "strerror", None) or str(cause)).lower()
    raise TrackingServerError(
        f"tracking.tracking_uri {uri}: no tracking server answers ({reason}); "
        "start it, fix the URI, or set tracking.enabled=false"
    )


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<db>.lock`` beside a SQLite store (its folder is created);
    nothing for other stores. Taken by every process around its first opening of the store."""
    database = sqlite_path(uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def short_requests() -> Iterator[None]:
    """MLflow HTTP calls inside fail after one try of a few seconds (limits the user set in the
    environment are kept). MLflow reads these limits per call, from the environment only."""
    saved = {key: os.environ.get(key) for key in SHORT_REQUESTS}
    for key, value in SHORT_REQUESTS.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, previous in saved.items():
            if previous is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = previous


def failure_reason(err: BaseException) -> str:
    """A short reason for a failed store call: the innermost OS error of the exception chain
    (``connection refused``, ``timed out``), else the first line of the message."""
    inner: BaseException | None = err
    while inner is not None:
        if isinstance(inner, TimeoutError) or type(inner).__name__.endswith("Timeout"):
            return "timed out"
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror.lower()
        inner = inner.__cause__ or inner.__context__
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def open_client(uri: str) -> Any:
    """A client of the store at ``uri``, the store created and migrated on first use under
    `store_lock` (MLflow opens the store when the client is made). Raises MLflow's errors."""
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        return MlflowClient(tracking_uri=uri)


def open_store(uri: str, experiment: str) -> tuple[Any, str]:
    """A client of the store at ``uri`` and the id of ``experiment`` (created if missing).

    The store is opened (created and migrated on first use) under `store_lock`. A new
    experiment of a SQLite store keeps its artifacts in ``mlartifacts/`` beside the database,
    not in the working directory. Raises MLflow's errors.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    database = sqlite_path(uri)
    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return client, found.experiment_id
        location = str(database.parent.resolve() / "mlartifacts") if database is not None else None
        try:
            return client, client.create_experiment(experiment, artifact_location=location)
        except MlflowException:  # a server's other client created it meanwhile
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            return client, found.experiment_id
