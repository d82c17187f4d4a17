"""Parametric scaling law L(N, D) = E + A / N^alpha + B / D^beta (Chinchilla approach 3).

Fit (Hoffmann et al. 2022, approach 3): with a = log A, b = log B, e = log E, minimise over
(a, b, e, alpha, beta)

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),  delta = 1e-3,

(LSE = log-sum-exp, so the model is log of E + A N^-alpha + B D^-beta) with L-BFGS from a grid of
starting points. The grid is Chinchilla's (alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ...,
1}, a, b in {0, 5, ..., 25}); to keep fits fast the objective is evaluated at every grid point
and L-BFGS starts from the best ``starts`` of them. The best local optimum wins.

Confidence intervals: bootstrap over runs (resample the runs with replacement, refit, take
percentiles).

Compute-optimal allocation under the closed-form budget C = 6 N D (minimise L subject to it):

    N*(C) = G (C/6)^a,  D*(C) = G^-1 (C/6)^b,
    G = (alpha A / (beta B))^(1 / (alpha + beta)),
    a = beta / (alpha + beta),  b = alpha / (alpha + beta).

C = 6ND is used only for this closed form; the runs' own FLOPs (``train.flops``, attention and
SSD terms included) differ from 6ND by a kind-dependent factor, reported as
``flops_ratio`` (median of train.flops / 6ND) and used to place the frontier on the runs' axis.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

HUBER_DELTA = 1e-3
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


@dataclass
class LawFit:
    """A fitted law L(N, D) = E + A / N^alpha + B / D^beta.

    ``objective`` is the sum of Huber losses of the log residuals at the optimum; ``n_runs``
    the number of runs fitted.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    n_runs: int

    def predict(self, n, d) -> np.ndarray:
        """Loss predicted at parameters ``n`` and tokens ``d`` (arrays broadcast)."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def a(self) -> float:
        """Exponent of N*(C): beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D*(C): alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """Coefficient of N*(C): (alpha A / (beta B))^(1 / (alpha + beta))."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimal_n(self, c) -> np.ndarray:
        """N*(C) = G (C/6)^a for a budget C = 6ND."""
        return self.G * (np.asarray(c, dtype=float) / 6.0) ** self.a

    def optimal_d(self, c) -> np.ndarray:
        """D*(C) = G^-1 (C/6)^b for a budget C = 6ND."""
        return (np.asarray(c, dtype=float) / 6.0) ** self.b / self.G

    def frontier(self, c) -> np.ndarray:
        """The lowest loss reachable with budget C = 6ND: L(N*(C), D*(C))."""
        return self.predict(self.optimal_n(c), self.optimal_d(c))

    def to_dict(self) -> dict:
        """Fitted values and the allocation's G, a, b as plain floats."""
        out = asdict(self)
        out.update(G=self.G, a=self.a, b=self.b)
        return out


def chinchilla_grid() -> np.ndarray:
    """Chinchilla's starting points as rows (a, b, e, alpha, beta): 6*6*5*5*5 = 4500 rows."""
    exps = np.arange(0.0, 2.01, 0.5)
    es = np.arange(-1.0, 1.01, 0.5)
    abs_ = np.arange(0.0, 25.01, 5.0)
    return np.array(list(itertools.product(abs_, abs_, es, exps, exps)))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    small = np.abs(r) <= delta
    return np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))


def _terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """The three log-terms (a - alpha log N, b - beta log D, e), shape (..., runs, 3)."""
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    return np.stack(
        [a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (a - alpha * log_n).shape)],
        axis=-1,
    )


def objective(theta, log_n, log_d, log_l, delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """Scaled Huber objective and its gradient at theta = (a, b, e, alpha, beta).

    Returns (sum_i Huber(r_i) / delta^2, gradient). The 1/delta^2 scaling keeps the objective of
    order one per run so that L-BFGS's relative stopping tests work; it moves no optimum.
    """
    a, b, e, alpha, beta = theta
    # Log-sum-exp written out (scipy's is ~20x slower on 3 x runs): this runs ~1e5 times a fit.
    t1, t2 = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(t1, t2), e)
    x1, x2, x3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)
    total = x1 + x2 + x3
    r = top + np.log(total) - log_l
    psi = np.clip(r, -delta, delta) / (delta * delta * total)  # Huber'(r) / delta^2 / sum
    g1, g2 = psi * x1, psi * x2  # psi * softmax weights
    grad = np.array([g1.sum(), g2.sum(), (psi * x3).sum(), -(g1 @ log_n), -(g2 @ log_d)])
    return float(_huber(r, delta).sum() / (delta * delta)), grad


def _grid_values(grid: np.ndarray, log_n, log_d, log_l, delta) -> np.ndarray:
    """The objective at every grid row (vectorised)."""
    r = logsumexp(_terms(grid, log_n, log_d), axis=-1) - log_l
    return _huber(r, delta).sum(axis=-1)


def single_threaded_blas():
    """Context limiting BLAS to one thread. L-BFGS-B on 5 parameters makes thousands of tiny
    BLAS calls; with OpenBLAS's thread pool on a busy machine each costs ~1 ms instead of ~1 us
    (a 10x slower fit). A no-op where threadpoolctl is missing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _lbfgs(theta0, log_n, log_d, log_l, delta):
    return minimize(
        objective,
        theta0,
        args=(log_n, log_d, log_l, delta),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9},
    )


def fit_law(
    n,
    d,
    loss,
    delta: float = HUBER_DELTA,
    starts: int = 32,
    grid: np.ndarray | None = None,
    extra_starts: list | None = None,
) -> LawFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to runs by Chinchilla's approach 3.

    Takes arrays of parameters ``n``, tokens ``d`` and final losses ``loss`` (one entry per run),
    the Huber delta, how many of the best grid points L-BFGS starts from, an optional grid
    (rows a, b, e, alpha, beta; default ``chinchilla_grid()``) and optional extra starting
    points. Returns the LawFit of the best optimum. Raises ValueError for fewer than 5 runs or
    non-positive inputs.
    """
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    if not (len(n) == len(d) == len(loss)):
        raise ValueError("n, d and loss must have the same length")
    if len(n) < 5:
        raise ValueError(f"a 5-parameter law needs at least 5 runs, got {len(n)}")
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0):
        raise ValueError("n, d and loss must all be positive")
    grid = chinchilla_grid() if grid is None else np.asarray(grid, dtype=float)
    with single_threaded_blas():
        return _fit(np.log(n), np.log(d), np.log(loss), delta, starts, grid, extra_starts or [])


def _fit(log_n, log_d, log_l, delta, starts, grid, extra_starts) -> LawFit:
    """fit_law on log inputs, without argument checks or the BLAS thread limit."""
    values = _grid_values(grid, log_n, log_d, log_l, delta)
    chosen = list(grid[np.argsort(values)[:starts]])
    chosen += [np.asarray(s, dtype=float) for s in extra_starts]
    best = None
    for theta0 in chosen:
        res = _lbfgs(theta0, log_n, log_d, log_l, delta)
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    a, b, e, alpha, beta = best.x
    return LawFit(
        E=float(np.exp(e)),
        A=float(np.exp(a)),
        B=float(np.exp(b)),
        alpha=float(alpha),
        beta=float(beta),
        objective=float(best.fun * delta**2),
        n_runs=len(log_n),
    )


def theta_of(fit: LawFit) -> np.ndarray:
    """The optimiser's coordinates (log A, log B, log E, alpha, beta) of a LawFit."""
    return np.array([np.log(fit.A), np.log(fit.B), np.log(fit.E), fit.alpha, fit.beta])


@dataclass
class Bootstrap:
    """Bootstrap confidence intervals of a law fit.

    ``intervals`` maps E, A, B, alpha, beta, G, a, b to [low, high] at ``level``;
    ``samples`` is the number of successful refits out of ``requested``.
    """

    level: float
    requested: int
    samples: int
    intervals: dict[str, list[float]]


def bootstrap_law(
    n,
    d,
    loss,
    fit: LawFit,
    samples: int = 200,
    level: float = 0.95,
    seed: int = 0,
    delta: float = HUBER_DELTA,
    starts: int = 1,
) -> Bootstrap:
    """Bootstrap confidence intervals: resample the runs with replacement and refit.

    Takes the runs' arrays, the fit on all runs (its optimum is one starting point of every
    refit, besides the ``starts`` best grid points), the number of resamples, the interval
    level and a seed. Resamples with fewer than 5 distinct runs are skipped. Returns a Bootstrap
    with percentile intervals.
    """
    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=float)) for x in (n, d, loss))
    rng = np.random.default_rng(seed)
    grid = chinchilla_grid()
    keys = PARAM_NAMES + ("G", "a", "b")
    draws: dict[str, list[float]] = {k: [] for k in keys}
    with single_threaded_blas():
        for _ in range(samples):
            idx = rng.integers(0, len(log_n), len(log_n))
            if len(np.unique(idx)) < 5:
                continue
            f = _fit(log_n[idx], log_d[idx], log_l[idx], delta, starts, grid, [theta_of(fit)])
            values = f.to_dict()
            if not all(np.isfinite(values[k]) for k in keys):
                continue
            for k in keys:
                draws[k].append(values[k])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    intervals = {
        k: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if v else [np.nan, np.nan]
        for k, v in draws.items()
    }
    return Bootstrap(level, samples, len(draws["E"]), intervals)


def flops_ratio(n, d, c) -> float:
    """Median of the runs' own training FLOPs over 6ND (how far the C = 6ND closed form is
    from the accounting's figure for this kind)."""
    n, d, c = (np.asarray(x, dtype=float) for x in (n, d, c))
    return float(np.median(c / (6.0 * n * d)))
