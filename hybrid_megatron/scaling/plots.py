"""PNG plots of the scaling fits (loss vs compute with the fitted frontier, isoFLOP curves) and
of a sweep's comparison (loss vs compute per kind)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hybrid_megatron.scaling.fit import LawFit
from hybrid_megatron.scaling.isoflop import IsoFlopFit
from hybrid_megatron.scaling.runs import RunSet


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_loss_vs_compute(plt, fig, ax, path: Path, title: str = "") -> Path:
    """Axes, labels and legend of a loss-against-FLOPs plot, then the PNG at ``path``."""
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (train.flops)")
    ax.set_ylabel("final val/loss")
    ax.set_title(f"{title}: loss vs compute" if title else "loss vs compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_loss_vs_compute(
    runs: dict[str, RunSet], fits: dict[str, LawFit], ratios: dict[str, float], path: Path
) -> Path:
    """Loss against training FLOPs per kind, with each fitted compute-optimal frontier.

    Takes kind -> RunSet, kind -> LawFit, kind -> flops_ratio (runs' FLOPs / 6ND) and the output
    path. Points are the runs' own FLOPs; the frontier L(N*(C6), D*(C6)) is computed with the
    closed form's C6 = 6ND and drawn at C = flops_ratio * C6 so it shares the runs' axis.
    Returns the path written.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (kind, rs) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        ax.scatter(rs.c, rs.loss, s=14, color=color, alpha=0.7, label=f"{kind} runs")
        fit = fits.get(kind)
        if fit is not None:
            c = np.logspace(np.log10(rs.c.min() / 2), np.log10(rs.c.max() * 2), 200)
            ax.plot(
                c,
                fit.frontier(c / ratios[kind]),
                color=color,
                label=f"{kind} frontier (a={fit.a:.2f}, b={fit.b:.2f})",
            )
    return _save_loss_vs_compute(plt, fig, ax, path)


def plot_isoflops(isofits: dict[str, IsoFlopFit], path: Path) -> Path:
    """IsoFLOP curves: per kind, loss vs N for each budget, its parabola and vertex.

    Takes kind -> IsoFlopFit (kinds without budgets are skipped) and the output path;
    returns the path written.
    """
    plt = _pyplot()
    kinds = [k for k, f in isofits.items() if f.budgets]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(5.5 * max(1, len(kinds)), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        fit = isofits[kind]
        cmap = plt.get_cmap("viridis", max(2, len(fit.budgets)))
        for j, b in enumerate(fit.budgets):
            color = cmap(j)
            ax.scatter(b.n, b.loss, s=14, color=color, label=f"C={b.flops:.2g}")
            if b.coeffs is not None:
                x = np.linspace(np.log(min(b.n)), np.log(max(b.n)), 100)
                ax.plot(np.exp(x), np.polyval(b.coeffs, x), color=color, lw=1)
            if b.used:
                ax.scatter(
                    [b.n_opt], [b.loss_opt], marker="*", s=90, color=color, edgecolors="black", zorder=3
                )
        title = kind if fit.exponent is None else f"{kind}: N_opt ~ C^{fit.exponent:.3f}"
        ax.set_title(title)
        ax.set_xscale("log")
        ax.set_xlabel("parameters N")
        ax.set_ylabel("final val/loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if not kinds:
        axes[0][0].text(0.5, 0.5, "no isoFLOP budgets", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_loss_per_kind(curves: dict[str, list[tuple[float, float]]], path: Path, title: str = "") -> Path:
    """Loss against training FLOPs, one line per kind.

    Takes kind -> (FLOPs, final loss) points in FLOPs order, the output path and a title prefix;
    returns the path written.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for kind, points in curves.items():
        c, loss = zip(*points)
        ax.plot(c, loss, marker="o", label=kind)
    return _save_loss_vs_compute(plt, fig, ax, path, title)
