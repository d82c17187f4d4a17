"""IsoFLOP-profile estimate of the compute-optimal model size (Chinchilla approach 2).

Runs whose training FLOPs (the runs' own ``train.flops``) agree within a relative tolerance form
one budget. Per budget with at least ``min_points`` distinct model sizes, a parabola of loss
against ln N is fitted; its vertex is that budget's N_opt, kept only when the parabola opens
upwards and the vertex lies inside the sizes tried (an extrapolated vertex is not a measured
optimum). With two or more such budgets, a line ln N_opt = ln k + a ln C gives N_opt = k C^a.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BUDGET_TOLERANCE = 0.05  # runs within 5% of a budget's smallest FLOPs belong to it


@dataclass
class Budget:
    """One isoFLOP budget: its runs, the parabola and its vertex (if usable)."""

    flops: float  # geometric mean of the runs' FLOPs
    run_ids: list[str]
    n: list[float]
    loss: list[float]
    coeffs: list[float] | None = None  # loss = c2 (ln N)^2 + c1 ln N + c0
    n_opt: float | None = None
    loss_opt: float | None = None
    note: str | None = None  # why the budget is not used, if it is not

    @property
    def used(self) -> bool:
        """Whether this budget's vertex enters the exponent fit."""
        return self.n_opt is not None


@dataclass
class IsoFlopFit:
    """N_opt = coefficient * C^exponent from the usable budgets (None when fewer than two).

    ``exponent_stderr`` is the slope's standard error (None with exactly two budgets).
    """

    budgets: list[Budget]
    exponent: float | None = None
    coefficient: float | None = None
    exponent_stderr: float | None = None
    used_budgets: int = field(init=False)

    def __post_init__(self) -> None:
        self.used_budgets = sum(b.used for b in self.budgets)

    def to_dict(self) -> dict:
        """Plain-data form for fit.json."""
        return {
            "exponent": self.exponent,
            "coefficient": self.coefficient,
            "exponent_stderr": self.exponent_stderr,
            "used_budgets": self.used_budgets,
            "budgets": [
                {
                    "flops": b.flops,
                    "runs": len(b.run_ids),
                    "n_opt": b.n_opt,
                    "loss_opt": b.loss_opt,
                    "coeffs": b.coeffs,
                    "note": b.note,
                }
                for b in self.budgets
            ],
        }


def group_budgets(c, tolerance: float = BUDGET_TOLERANCE) -> list[np.ndarray]:
    """Indices of runs sharing a FLOP budget.

    Takes the runs' FLOPs; sorts them and starts a new group whenever a run's FLOPs exceed the
    group's smallest by more than ``tolerance`` (relative). Returns index arrays, smallest
    budget first.
    """
    c = np.asarray(c, dtype=float)
    order = np.argsort(c)
    if len(order) == 0:
        return []
    groups, current = [], [order[0]]
    for i in order[1:]:
        if c[i] <= c[current[0]] * (1 + tolerance):
            current.append(i)
        else:
            groups.append(np.array(current))
            current = [i]
    groups.append(np.array(current))
    return groups


def fit_budget(run_ids, n, loss, flops: float, min_points: int = 3) -> Budget:
    """Fit the parabola of one budget and locate its vertex.

    Takes the budget's run ids, sizes and losses and its FLOPs; returns a Budget whose
    ``n_opt`` is None (with a ``note``) when there are too few distinct sizes, the parabola
    opens downwards, or the vertex lies outside the sizes tried.
    """
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    budget = Budget(flops=float(flops), run_ids=list(run_ids), n=n.tolist(), loss=loss.tolist())
    if len(np.unique(n)) < min_points:
        budget.note = f"{len(np.unique(n))} distinct sizes (< {min_points})"
        return budget
    x = np.log(n)
    c2, c1, c0 = np.polyfit(x, loss, 2)
    budget.coeffs = [float(c2), float(c1), float(c0)]
    if c2 <= 0:
        budget.note = "parabola opens downwards: no minimum"
        return budget
    vertex = -c1 / (2 * c2)
    if not x.min() <= vertex <= x.max():
        budget.note = "minimum outside the sizes tried"
        return budget
    budget.n_opt = float(np.exp(vertex))
    budget.loss_opt = float(c0 - c1 * c1 / (4 * c2))
    return budget


def fit_isoflop(run_ids, n, c, loss, tolerance: float = BUDGET_TOLERANCE, min_points: int = 3) -> IsoFlopFit:
    """IsoFLOP estimate of N_opt(C) = k C^a from one kind's runs.

    Takes run ids, parameters, training FLOPs and final losses (aligned arrays), the budget
    tolerance and the minimum distinct sizes per budget. Returns an IsoFlopFit: every budget
    with at least ``min_points`` runs, and the exponent and coefficient when two or more
    budgets have a usable vertex (else None).
    """
    run_ids = list(run_ids)
    n, c, loss = (np.asarray(x, dtype=float) for x in (n, c, loss))
    budgets = []
    for idx in group_budgets(c, tolerance):
        if len(idx) < min_points:
            continue
        flops = float(np.exp(np.mean(np.log(c[idx]))))
        budgets.append(fit_budget([run_ids[i] for i in idx], n[idx], loss[idx], flops, min_points))
    result = IsoFlopFit(budgets=budgets)
    used = [b for b in budgets if b.used]
    if len(used) < 2:
        return result
    log_c = np.log([b.flops for b in used])
    log_n = np.log([b.n_opt for b in used])
    if len(used) > 2:
        (slope, intercept), cov = np.polyfit(log_c, log_n, 1, cov="unscaled")
        residual = log_n - (slope * log_c + intercept)
        sigma2 = float(residual @ residual) / (len(used) - 2)
        result.exponent_stderr = float(np.sqrt(cov[0, 0] * sigma2))
    else:
        slope, intercept = np.polyfit(log_c, log_n, 1)
    result.exponent = float(slope)
    result.coefficient = float(np.exp(intercept))
    return result
