"""Scaling laws from tracked runs: Chinchilla approach-3 fits, bootstrap intervals,
compute-optimal allocation and isoFLOP profiles; a sweep's comparison table of final losses per
budget and kind (`hybrid_megatron.scaling.compare`); and the compute-matched sweeps that plan
those runs (`hybrid_megatron.scaling.sweep`).

``python -m hybrid_megatron.scaling fit|compare --tracking-uri URI --experiment NAME [--group G] --out DIR``
"""

from hybrid_megatron.scaling.analysis import analyze, write_outputs
from hybrid_megatron.scaling.compare import Comparison, compare
from hybrid_megatron.scaling.fit import Bootstrap, LawFit, bootstrap_law, fit_law, flops_ratio
from hybrid_megatron.scaling.isoflop import Budget, IsoFlopFit, fit_isoflop, group_budgets
from hybrid_megatron.scaling.runs import RunPoint, RunsError, RunSet, load_runs

__all__ = [
    "Bootstrap",
    "Budget",
    "Comparison",
    "IsoFlopFit",
    "LawFit",
    "RunPoint",
    "RunSet",
    "RunsError",
    "analyze",
    "bootstrap_law",
    "compare",
    "fit_isoflop",
    "fit_law",
    "flops_ratio",
    "group_budgets",
    "load_runs",
    "write_outputs",
]
