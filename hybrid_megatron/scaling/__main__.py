"""``python -m hybrid_megatron.scaling fit|compare --tracking-uri URI --experiment NAME
[--group G] --out DIR``: scaling-law fits of an MLflow experiment's finished runs (``fit``,
at least 5 runs per kind), or the sweep's table of final losses per budget and kind with a plot
of loss against FLOPs (``compare``, from 2 runs). ``claims COMPARE_JSON... [--out FILE]``: the
paper's design claims checked against those tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    """Fit scaling laws to an MLflow experiment's finished runs and write fit.json and plots.

    Takes command-line arguments; returns the exit status (2 when the runs cannot be fitted:
    unknown experiment, too few runs, missing params or metrics; the message names the runs).
    """
    parser = argparse.ArgumentParser(prog="python -m hybrid_megatron.scaling")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit L(N, D) per kind, allocation, isoFLOP profiles")
    fit.add_argument("--tracking-uri", required=True, help="sqlite:///..., file:... or http://...")
    fit.add_argument("--experiment", required=True, help="MLflow experiment name")
    fit.add_argument("--group", default=None, help="only runs with tag hm.compare_group = G")
    fit.add_argument("--out", required=True, help="output directory for fit.json and PNGs")
    fit.add_argument("--min-runs", type=int, default=5, help="runs needed per kind")
    fit.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples (0: none)")
    fit.add_argument("--level", type=float, default=0.95, help="confidence level")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument(
        "--budget-tolerance",
        type=float,
        default=0.05,
        help="relative FLOPs difference within one isoFLOP budget",
    )
    cmp = sub.add_parser("compare", help="final val/loss per budget and kind, best marked; PNG")
    cmp.add_argument("--tracking-uri", required=True, help="sqlite:///..., file:... or http://...")
    cmp.add_argument("--experiment", required=True, help="MLflow experiment name")
    cmp.add_argument("--group", default=None, help="only runs with tag hm.compare_group = G")
    cmp.add_argument(
        "--out",
        default="compare_out",
        help="output directory for compare.json and loss_vs_flops.png (default compare_out)",
    )
    claims = sub.add_parser("claims", help="the paper's design claims against compare tables")
    claims.add_argument("tables", nargs="+", help="compare.json files written by compare")
    claims.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args(argv)

    if args.command == "claims":
        return _claims(args)
    from hybrid_megatron import runtime
    from hybrid_megatron.errors import InputError

    runtime.setup()
    if args.command == "compare":
        return _compare(args)
    from hybrid_megatron.scaling.analysis import analyze, write_outputs
    from hybrid_megatron.scaling.commands import scaling_command
    from hybrid_megatron.scaling.runs import (
        TooFewRunsError,
        group_by_kind,
        n_parameter,
        points_from_frame,
        search_finished,
    )

    try:
        frame = search_finished(args.tracking_uri, args.experiment, args.group)
        runs = group_by_kind(points_from_frame(frame), args.min_runs)
    except TooFewRunsError as err:
        out = str(Path(args.out).parent / "compare")
        print(
            f"error: {err}\nthese runs can still be compared (from 2 runs up):\n  "
            f"{scaling_command('compare', args.tracking_uri, args.experiment, args.group, out)}",
            file=sys.stderr,
        )
        return 2
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = analyze(
        runs, bootstrap=args.bootstrap, level=args.level, seed=args.seed, tolerance=args.budget_tolerance
    )
    meta = {
        "tracking_uri": args.tracking_uri,
        "experiment": args.experiment,
        "group": args.group,
        "n": n_parameter(frame),  # the logged param the fit took as N
    }
    paths = write_outputs(result, runs, args.out, meta)
    print(f"N: {meta['n']}")
    for kind, entry in result["kinds"].items():
        law, iso = entry["law"], entry["isoflop"]
        iso_text = f", isoFLOP a={iso['exponent']:.3f}" if iso["exponent"] is not None else ""
        print(
            f"{kind}: {entry['n_runs']} runs, E={law['E']:.3f} A={law['A']:.4g} "
            f"alpha={law['alpha']:.3f} B={law['B']:.4g} beta={law['beta']:.3f}; "
            f"N* ~ C^{law['a']:.3f}, D* ~ C^{law['b']:.3f}{iso_text}"
        )
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """The ``compare`` command: print the table, write compare.json and the PNG."""
    from hybrid_megatron.errors import InputError
    from hybrid_megatron.scaling.compare import comparison_of_frame, write_comparison
    from hybrid_megatron.scaling.runs import points_from_frame, search_finished

    try:
        frame = search_finished(args.tracking_uri, args.experiment, args.group)
        comparison = comparison_of_frame(frame)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = {"tracking_uri": args.tracking_uri, "experiment": args.experiment, "group": args.group}
    paths = write_comparison(points_from_frame(frame), comparison, args.out, meta)
    print(comparison.format(args.group or args.experiment))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _claims(args: argparse.Namespace) -> int:
    """The ``claims`` command: print (and write) the claims table; 2 on an unreadable table."""
    from hybrid_megatron.scaling.claims import ClaimsError, check_claims, format_findings, read_comparison

    tables = {}
    try:
        for path in map(Path, args.tables):
            table = read_comparison(path)
            name = table.get("group") or table.get("experiment") or path.parent.name
            tables[name if name not in tables else f"{name} ({path})"] = table  # none dropped
    except ClaimsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = format_findings(check_claims(tables))
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
