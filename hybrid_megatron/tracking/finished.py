"""Which training runs an MLflow store holds as finished, by run name and compare group.

A run counts as finished in the store when its MLflow status is FINISHED (the trainer ends a
run that reached its last step that way; a stop signal ends it KILLED, an exception FAILED, a
killed process leaves it RUNNING) and its last logged step of ``train/loss`` (logged at every
step) is the step asked for. The step check keeps a run of the same name but another length
(the recipe's token budget changed since) from counting. Runs deleted in MLflow are not read,
so deleting a run there makes a sweep run it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybrid_megatron.tracking.store import open_client, short_requests, sqlite_path
from hybrid_megatron.tracking.tags import TAG_GROUP

STEP_METRIC = "train/loss"  # logged by the trainer at every step
PAGE = 10_000  # runs per search request


@dataclass(frozen=True)
class StoredRun:
    """A FINISHED run of the store: its id, name, compare group ("" without) and end time (ms)."""

    run_id: str
    name: str
    group: str
    end_time: int


class FinishedRuns:
    """The FINISHED runs of one experiment of a store, read once, looked up by name and group.

    Args:
        uri: the tracking URI (``sqlite:///...``, a file store or a server).
        experiment: the experiment name.

    A SQLite database that does not exist yet or an experiment it lacks holds no runs (nothing
    is created). Raises MLflow's errors (MlflowException) or OSError when the store cannot be
    read.
    """

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri, self.experiment = uri, experiment
        self.runs: list[StoredRun] = []
        self._client: Any = None
        database = sqlite_path(uri)
        if database is not None and not database.is_file():
            return
        with short_requests():
            self._client = open_client(uri)
            found = self._client.get_experiment_by_name(experiment)
            if found is None:
                return
            token = None
            while True:
                page = self._client.search_runs(
                    [found.experiment_id],
                    filter_string="attributes.status = 'FINISHED'",
                    max_results=PAGE,
                    page_token=token,
                )
                self.runs += [
                    StoredRun(
                        run.info.run_id,
                        run.info.run_name or "",
                        run.data.tags.get(TAG_GROUP, ""),
                        run.info.end_time or 0,
                    )
                    for run in page
                ]
                token = page.token
                if not token:
                    break

    def last_step(self, run_id: str) -> int | None:
        """The last step the run logged ``train/loss`` at (None: never)."""
        with short_requests():
            history = self._client.get_metric_history(run_id, STEP_METRIC)
        return max((m.step for m in history), default=None)

    def reached(self, name: str, group: str | None, step: int) -> str | None:
        """The id of a FINISHED run named ``name`` in compare group ``group`` (None: no group)
        whose last ``train/loss`` step is ``step``; of several such runs the latest to end.
        None when there is none."""
        candidates = [r for r in self.runs if r.name == name and r.group == (group or "")]
        for run in sorted(candidates, key=lambda r: r.end_time, reverse=True):
            if self.last_step(run.run_id) == step:
                return run.run_id
        return None
