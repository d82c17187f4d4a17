"""One scaling analysis: law fit, bootstrap, compute-optimal allocation and isoFLOP estimate per
kind, written as ``fit.json`` plus PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hybrid_megatron.scaling.fit import bootstrap_law, fit_law, flops_ratio
from hybrid_megatron.scaling.isoflop import BUDGET_TOLERANCE, fit_isoflop
from hybrid_megatron.scaling.plots import plot_isoflops, plot_loss_vs_compute
from hybrid_megatron.scaling.runs import RunSet

FIT_JSON = "fit.json"
LOSS_PNG = "loss_vs_compute.png"
ISOFLOP_PNG = "isoflop.png"
ALLOCATION = (
    "N*(C) = G (C/6)^a, D*(C) = G^-1 (C/6)^b, a = beta/(alpha+beta), "
    "b = alpha/(alpha+beta), G = (alpha A / (beta B))^(1/(alpha+beta)), with C = 6ND"
)


def analyze(
    runs: dict[str, RunSet],
    bootstrap: int = 100,
    level: float = 0.95,
    seed: int = 0,
    tolerance: float = BUDGET_TOLERANCE,
) -> dict:
    """Fit every kind's runs.

    Takes kind -> RunSet, the number of bootstrap resamples (0: none), the interval level, a
    seed and the isoFLOP budget tolerance. Returns a JSON-ready dict: per kind the run ids, the
    law (E, A, B, alpha, beta, objective, G, a, b), bootstrap intervals, the allocation, the
    runs' ``flops_ratio`` (train.flops / 6ND) and the isoFLOP estimate; plus private ``_fits`` /
    ``_isofits`` / ``_ratios`` entries holding the objects the plots need.
    """
    out: dict = {"kinds": {}}
    fits, isofits, ratios = {}, {}, {}
    for kind, rs in runs.items():
        fit = fit_law(rs.n, rs.d, rs.loss)
        fits[kind] = fit
        ratios[kind] = flops_ratio(rs.n, rs.d, rs.c)
        iso = fit_isoflop(rs.run_ids, rs.n, rs.c, rs.loss, tolerance=tolerance)
        isofits[kind] = iso
        entry = {
            "n_runs": len(rs),
            "run_ids": rs.run_ids,
            "law": fit.to_dict(),
            "compute_optimal": {"G": fit.G, "a": fit.a, "b": fit.b, "formula": ALLOCATION},
            "flops_ratio": ratios[kind],
            "isoflop": iso.to_dict(),
        }
        if bootstrap > 0:
            boot = bootstrap_law(rs.n, rs.d, rs.loss, fit, samples=bootstrap, level=level, seed=seed)
            entry["bootstrap"] = {
                "level": boot.level,
                "requested": boot.requested,
                "samples": boot.samples,
                "intervals": boot.intervals,
            }
        out["kinds"][kind] = entry
    out["_fits"], out["_isofits"], out["_ratios"] = fits, isofits, ratios
    return out


def write_outputs(
    result: dict, runs: dict[str, RunSet], out_dir: Path, meta: dict | None = None
) -> dict[str, Path]:
    """Write ``fit.json``, ``loss_vs_compute.png`` and ``isoflop.png`` into ``out_dir``.

    Takes ``analyze``'s result, the runs, the output directory (created) and metadata merged
    into fit.json (tracking URI, experiment, group). Returns name -> path of the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        LOSS_PNG: plot_loss_vs_compute(runs, result["_fits"], result["_ratios"], out_dir / LOSS_PNG),
        ISOFLOP_PNG: plot_isoflops(result["_isofits"], out_dir / ISOFLOP_PNG),
    }
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    document = _finite({**(meta or {}), **public, "plots": sorted(paths)})
    paths[FIT_JSON] = out_dir / FIT_JSON
    paths[FIT_JSON].write_text(json.dumps(document, indent=2, allow_nan=False))
    return paths


def _finite(value):
    """``value`` with every NaN or infinite float replaced by None (strict JSON has neither)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
