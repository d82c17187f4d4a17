"""A sweep's comparison table: final validation loss per kind at each matched budget.

The table the paper reports: one row per compute budget (F-matched sweeps; runs whose
``train.flops`` agree within a relative tolerance share a row) or per parameter count
(P-matched sweeps, tag ``hm.match`` = P; runs within ``PARAMS_TOLERANCE`` of each other share a
row, split further by token budget), one column per kind, best kind of each row marked. Unlike a
law fit it needs no minimum per kind: two runs already compare.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hybrid_megatron.config.model import Kind
from hybrid_megatron.scaling.isoflop import BUDGET_TOLERANCE, group_budgets
from hybrid_megatron.scaling.plots import plot_loss_per_kind
from hybrid_megatron.scaling.runs import RunPoint, RunsError, points_from_frame
from hybrid_megatron.tracking.tags import TAG_MATCH

MIN_RUNS = 2
PARAMS_TOLERANCE = 0.25  # P-matched kinds of one scale differ by ~10% in parameters
KIND_ORDER = typing.get_args(Kind)  # the paper's column order
COMPARE_JSON = "compare.json"
COMPARE_PNG = "loss_vs_flops.png"
BEST_MARK = "*"


@dataclass(frozen=True)
class Row:
    """One matched budget: ``value`` is its FLOPs (F) or parameter count (P), ``tokens`` its
    token budget (P only); per kind its final loss there (the mean over repeats of one model
    size, and of several sizes the lowest: the best the kind reached at that budget, as an
    isoFLOP study reads it), and the best kind (lowest loss; None when the row holds a single kind)."""

    label: str
    value: float
    tokens: float | None
    losses: dict[str, float]
    run_ids: dict[str, list[str]]
    best: str | None


@dataclass(frozen=True)
class Comparison:
    """The table: ``match`` (F or P), the kinds in column order and the rows, smallest first."""

    match: str
    kinds: list[str]
    rows: list[Row]

    def format(self, title: str = "") -> str:
        """Fixed-width text: a header line, the column names, one line per row."""
        axis = "FLOPs" if self.match == "F" else "params"
        head = f"{title}: " if title else ""
        lines = [
            f"{head}final val/loss per {'compute budget' if self.match == 'F' else 'parameter count'} "
            f"({self.match}-matched), {BEST_MARK} = best in row"
        ]
        width = max([len(axis)] + [len(r.label) for r in self.rows])
        lines.append(f"{axis:<{width}}" + "".join(f"  {k:>12}" for k in self.kinds))
        for row in self.rows:
            cells = []
            for kind in self.kinds:
                if kind not in row.losses:
                    cells.append(f"  {'-':>12}")
                    continue
                count = len(row.run_ids[kind])
                text = f"{row.losses[kind]:.4f}" + (f" x{count}" if count > 1 else "")
                text += BEST_MARK if kind == row.best else " "
                cells.append(f"  {text:>12}")
            lines.append(f"{row.label:<{width}}" + "".join(cells))
        return "\n".join(line.rstrip() for line in lines)

    def to_dict(self) -> dict:
        """Plain data for compare.json."""
        return {"match": self.match, "kinds": self.kinds, "rows": [asdict(r) for r in self.rows]}


def _short(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def _best_size_loss(points: list[RunPoint]) -> float:
    """The lowest of the per-size mean losses (sizes by parameter count, equal within 1%)."""
    by_size: dict[float, list[float]] = {}
    for p in sorted(points, key=lambda p: p.n):
        size = next((n for n in by_size if abs(p.n - n) <= 0.01 * n), p.n)
        by_size.setdefault(size, []).append(p.loss)
    return float(min(np.mean(losses) for losses in by_size.values()))


def _row(points: list[RunPoint], value: float, label: str, tokens: float | None) -> Row:
    by_kind: dict[str, list[RunPoint]] = {}
    for p in points:
        by_kind.setdefault(p.kind, []).append(p)
    losses = {k: _best_size_loss(v) for k, v in by_kind.items()}
    best = min(losses, key=losses.__getitem__) if len(losses) > 1 else None
    return Row(
        label=label,
        value=value,
        tokens=tokens,
        losses=losses,
        run_ids={k: [p.run_id for p in v] for k, v in by_kind.items()},
        best=best,
    )


def _geomean(x) -> float:
    return float(np.exp(np.mean(np.log(np.asarray(x, dtype=float)))))


def _column_order(kind: str) -> tuple:
    """Sort key of a comparison column: the paper's kind order, a kind's variants
    (``<kind>-<variant>``) right after it, unknown kinds last."""
    base, _, variant = kind.partition("-")
    rank = KIND_ORDER.index(base) if base in KIND_ORDER else len(KIND_ORDER)
    return rank, base, variant


def compare(points: list[RunPoint], match: str = "F", tolerance: float = BUDGET_TOLERANCE) -> Comparison:
    """Build the comparison table of ``points``.

    Takes the runs, the sweep's match (F: rows are FLOP budgets within ``tolerance``; P: rows
    are parameter counts within ``PARAMS_TOLERANCE``, per token budget within ``tolerance``).
    Returns a Comparison with the kinds in the paper's order, each kind's variants after it
    (unknown kinds last, sorted).
    Raises RunsError for fewer than two runs.
    """
    if len(points) < MIN_RUNS:
        raise RunsError(f"a comparison needs at least {MIN_RUNS} runs, got {len(points)}")
    kinds = sorted({p.kind for p in points}, key=_column_order)
    rows = []
    if match == "P":
        token_groups = group_budgets([p.d for p in points], tolerance)
        for tg in token_groups:
            group = [points[i] for i in tg]
            tokens = _geomean([p.d for p in group])
            for ng in group_budgets([p.n for p in group], PARAMS_TOLERANCE):
                members = [group[i] for i in ng]
                n = _geomean([p.n for p in members])
                label = _short(n) if len(token_groups) == 1 else f"{_short(n)} @ {_short(tokens)} tok"
                rows.append(_row(members, n, label, tokens))
    else:
        for cg in group_budgets([p.c for p in points], tolerance):
            members = [points[i] for i in cg]
            c = _geomean([p.c for p in members])
            rows.append(_row(members, c, f"{c:.3e}", None))
    return Comparison(match=match, kinds=kinds, rows=rows)


def comparison_of_frame(frame) -> Comparison:
    """The comparison of ``mlflow.search_runs`` output; the match is P only when every run's tag
    ``hm.match`` says P (runs without the tag compare by compute)."""
    column = f"tags.{TAG_MATCH}"
    matches = set(frame[column]) if column in frame.columns else set()
    return compare(points_from_frame(frame), "P" if matches == {"P"} else "F")


def write_comparison(
    points: list[RunPoint], comparison: Comparison, out_dir: Path, meta: dict | None = None
) -> dict[str, Path]:
    """Write ``compare.json`` (table and ``meta``) and ``loss_vs_flops.png`` into ``out_dir``
    (created). Returns name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = (meta or {}).get("group") or (meta or {}).get("experiment") or ""
    curves = {k: sorted((p.c, p.loss) for p in points if p.kind == k) for k in comparison.kinds}
    paths = {COMPARE_PNG: plot_loss_per_kind(curves, out_dir / COMPARE_PNG, title)}
    paths[COMPARE_JSON] = out_dir / COMPARE_JSON
    paths[COMPARE_JSON].write_text(json.dumps({**(meta or {}), **comparison.to_dict()}, indent=2))
    return paths
