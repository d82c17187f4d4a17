"""Finished training runs read back from MLflow, grouped by kind, checked for fitting.

Each run contributes one point (N, D, C, L):

- N = param ``model.non_embedding_parameters`` (the usual N of scaling laws: at small sizes a
  large vocabulary's embedding would dominate the total), or ``model.num_parameters`` for all
  runs when any run lacks it (logged before it existed), D = param ``train.tokens``,
  C = param ``train.flops`` (the run's own planned training FLOPs from the accounting module),
- L = the final value of metric ``val/loss`` (MLflow keeps the value at the latest step),
- the kind is tag ``hm.kind``, or ``<kind>-<variant>`` for a run tagged ``hm.variant`` (an
  ablation, compared as a kind of its own); tag ``hm.compare_group`` selects a sweep; tag
  ``hm.match`` (P or F) says how the sweep matched its runs.

Only FINISHED runs count (a run stopped part-way is KILLED, FAILED or still RUNNING), and a run
name finished more than once in one compare group counts once, by its latest finished run: a
sweep run whose checkpoints were lost is run again under the same name, and one training run
must not weigh twice in a fit or a mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybrid_megatron.errors import InputError
from hybrid_megatron.tracking.tags import TAG_GROUP, TAG_KIND, TAG_RUN_NAME, TAG_VARIANT

PARAM_N = "model.num_parameters"
PARAM_N_NON_EMBEDDING = "model.non_embedding_parameters"
PARAM_D = "train.tokens"
PARAM_C = "train.flops"
METRIC_LOSS = "val/loss"
MIN_RUNS = 5  # a 5-parameter law needs at least as many points per kind


class RunsError(InputError, ValueError):
    """Runs that cannot be fitted: missing fields (naming the run ids) or too few runs."""


class TooFewRunsError(RunsError):
    """Fewer runs of some kind than a fit needs (they can still be compared)."""


@dataclass(frozen=True)
class RunPoint:
    """One finished run as a scaling-law data point."""

    run_id: str
    kind: str
    n: float
    d: float
    c: float
    loss: float


@dataclass
class RunSet:
    """The runs of one kind, as arrays aligned with ``run_ids``."""

    kind: str
    run_ids: list[str]
    n: np.ndarray
    d: np.ndarray
    c: np.ndarray
    loss: np.ndarray

    @classmethod
    def from_points(cls, kind: str, points: list[RunPoint]) -> RunSet:
        """Stack RunPoints of one kind into arrays (float64)."""
        return cls(
            kind=kind,
            run_ids=[p.run_id for p in points],
            n=np.array([p.n for p in points], dtype=float),
            d=np.array([p.d for p in points], dtype=float),
            c=np.array([p.c for p in points], dtype=float),
            loss=np.array([p.loss for p in points], dtype=float),
        )

    def __len__(self) -> int:
        return len(self.run_ids)


def _number(value) -> float | None:
    """A positive finite float from an MLflow param/metric cell, else None."""
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def n_parameter(frame) -> str:
    """Which logged param is N for these runs: the non-embedding count when every run has it,
    else the total (one definition of N across the runs either way)."""
    column = f"params.{PARAM_N_NON_EMBEDDING}"
    if column in frame.columns and all(_number(v) is not None for v in frame[column]):
        return PARAM_N_NON_EMBEDDING
    return PARAM_N


def points_from_frame(frame) -> list[RunPoint]:
    """Convert ``mlflow.search_runs`` output (a pandas DataFrame) into RunPoints.

    Takes the frame; returns one RunPoint per row. Raises RunsError listing, per missing or
    invalid field, the run ids that lack it (a param or tag that is absent, a ``val/loss`` never
    logged, or a non-positive / non-numeric value).
    """
    fields = {  # RunPoint field -> (search_runs column prefix, MLflow name)
        "n": ("params", n_parameter(frame)),
        "d": ("params", PARAM_D),
        "c": ("params", PARAM_C),
        "loss": ("metrics", METRIC_LOSS),
        "kind": ("tags", TAG_KIND),
    }
    problems: dict[str, list[str]] = {}
    points = []
    for _, row in frame.iterrows():
        values: dict[str, Any] = {}
        for key, (prefix, name) in fields.items():
            column = f"{prefix}.{name}"
            raw = row[column] if column in frame.columns else None
            if key == "kind":
                values[key] = raw if isinstance(raw, str) and raw else None
            else:
                values[key] = _number(raw)
            if values[key] is None:
                problems.setdefault(name, []).append(row["run_id"])
        if all(v is not None for v in values.values()):
            variant = row.get(f"tags.{TAG_VARIANT}")
            if isinstance(variant, str) and variant:
                values["kind"] = f"{values['kind']}-{variant}"
            points.append(RunPoint(run_id=row["run_id"], **values))
    if problems:
        lines = [
            f"  {field}: missing or invalid in run(s) {', '.join(ids)}" for field, ids in problems.items()
        ]
        raise RunsError("runs cannot be fitted:\n" + "\n".join(lines))
    return points


def group_by_kind(points: list[RunPoint], min_runs: int = MIN_RUNS) -> dict[str, RunSet]:
    """Group RunPoints by kind (``hm.kind``), each with at least ``min_runs`` runs.

    Returns kind -> RunSet in sorted kind order. Raises RunsError naming each kind with
    too few runs and its run ids.
    """
    by_kind: dict[str, list[RunPoint]] = {}
    for p in points:
        by_kind.setdefault(p.kind, []).append(p)
    short = {k: v for k, v in by_kind.items() if len(v) < min_runs}
    if short:
        lines = [
            f"  {k}: {len(v)} run(s) ({', '.join(p.run_id for p in v)})" for k, v in sorted(short.items())
        ]
        raise TooFewRunsError(
            f"too few runs to fit a scaling law (need at least {min_runs} per kind):\n" + "\n".join(lines)
        )
    return {k: RunSet.from_points(k, by_kind[k]) for k in sorted(by_kind)}


def latest_per_name(frame):
    """The rows of ``mlflow.search_runs`` output with one run per (run name, compare group):
    of runs sharing both, the one that ended last. Rows without a run name are all kept; the
    order of the rows is kept."""
    name, group = f"tags.{TAG_RUN_NAME}", f"tags.{TAG_GROUP}"
    if len(frame) == 0 or name not in frame.columns:
        return frame
    keys = frame.assign(**{group: frame[group].fillna("") if group in frame.columns else ""})
    latest_first = keys.sort_values("end_time", ascending=False, kind="stable")
    named = latest_first[name].notna()
    kept = latest_first[named].drop_duplicates(subset=[name, group]).index.union(latest_first[~named].index)
    return frame.loc[frame.index.isin(kept)]


def search_finished(tracking_uri: str, experiment: str, group: str | None = None):
    """The finished runs of an MLflow experiment (optionally one compare group), one per run
    name and group (see `latest_per_name`).

    Takes the tracking URI (``sqlite:///...``, a file store or ``http://`` server), the
    experiment name and an optional ``hm.compare_group``. Returns ``mlflow.search_runs``'s
    pandas DataFrame (at least one row). Raises RunsError for an unknown experiment or no
    finished runs.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    if MlflowClient(tracking_uri).get_experiment_by_name(experiment) is None:
        raise RunsError(f"no experiment named {experiment!r} at {tracking_uri}")
    filters = ["attributes.status = 'FINISHED'"]
    if group is not None:
        filters.append(f"tags.`{TAG_GROUP}` = '{group}'")
    frame = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=" and ".join(filters),
        output_format="pandas",
        max_results=100_000,
    )
    if len(frame) == 0:
        where = f" in compare group {group!r}" if group is not None else ""
        raise RunsError(f"no finished runs in experiment {experiment!r}{where} at {tracking_uri}")
    return latest_per_name(frame)


def load_runs(
    tracking_uri: str, experiment: str, group: str | None = None, min_runs: int = MIN_RUNS
) -> dict[str, RunSet]:
    """Read the finished runs of an MLflow experiment, per kind.

    Takes the tracking URI, the experiment name, an optional ``hm.compare_group`` to select,
    and the minimum number of runs per kind. Returns kind -> RunSet. Raises RunsError for an
    unknown experiment, no finished runs or missing params/metrics (naming the run ids), and
    TooFewRunsError for too few runs.
    """
    frame = search_finished(tracking_uri, experiment, group)
    return group_by_kind(points_from_frame(frame), min_runs)
