"""The launcher's command line: train a recipe on SLURM, on this machine, or print the plan.

    python launch/slurm.py RECIPE [key.path=value ...] [--local [--nproc N]] [--dry-run]
                                  [--wait] [--sweep [--local --concurrent N --stop-after SECONDS]]
                                  [--plan [--gpus N] [--gpu-memory GiB]]

SLURM (default): submits one job (see `hybrid_megatron.launch.slurm`), prints the job id and
log paths, and returns (``--wait``: follows rank 0's log until the job ends and exits non-zero
if a rank failed). ``--sweep``: RECIPE is a sweep file; its runs are one job array (``--wait``:
follows each run in turn, exit 1 if any failed), or with ``--local`` run one after another;
finished runs are skipped, so the same command continues a stopped sweep. ``--concurrent N``
(local sweeps): up to N runs at a time, in the sweep's order as slots free up, each on its own
rendezvous port and logs, all sharing this machine's GPUs, the CPUs divided among them.
``--stop-after SECONDS`` (local sweeps): no run starts with less than ``--start-margin`` seconds
(default 60) left, and every run going at the limit gets SIGTERM (it saves a checkpoint at its
step and stops; cancelled a minute later if still running); the launcher prints the runs left
to do and exits 3.
``--local``: the same job through submitit's LocalExecutor, ``--nproc`` processes on this
machine (default: the smallest world size the recipe's tp/pp/ep fit, or one per GPU of the
recipe's ``gpus_per_node`` when CUDA is present); waits, streams rank 0's log, and exits 1
with the failing rank's error if any rank fails. ``--dry-run``: prints the resolved recipe, the
derived quantities, the layout's predicted memory and step time (refused, exit 2, when the
predicted peak exceeds the GPU's memory) and the sbatch script (or the local plan); submits
nothing, then checks the inputs as a run would. Before a run (and at the end of a dry run,
exit 2 on failure), the recipe's data prefixes, tokenizer and checkpoint paths are checked to
exist and a tracking server to answer. ``--plan``: every valid TP x CP x PP x EP layout of
the recipe's model on ``--gpus`` GPUs (default the recipe's world size), each at its fastest
fitting micro-batch size and recompute mode, with predicted per-GPU memory by part, step time,
tokens/s, MFU and whether it fits ``--gpu-memory`` GiB (default: the recipe's GPU type, else
80), the best first, and the recipe's own layout, micro-batch and recompute marked
(`hybrid_megatron.accounting.layout_plan`). Every rank runs
`hybrid_megatron.launch.job.TrainJob`.

Exit codes: 0 success (or submitted), 1 a rank or the job failed, 2 bad usage / recipe / no
SLURM, 3 a local sweep stopped at ``--stop-after`` with runs left to do (run it again).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from hybrid_megatron import runtime
from hybrid_megatron.errors import InputError
from hybrid_megatron.launch.job import ENTRY_ENV
from hybrid_megatron.launch.local import next_steps, run_local
from hybrid_megatron.launch.plan import (
    UsageError,
    check_inputs,
    check_tracking,
    describe,
    load,
    local_world,
    log_folder,
)
from hybrid_megatron.launch.slurm import render_sbatch, run_slurm
from hybrid_megatron.launch.sweep import run_sweep


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="launch/slurm.py",
        description="Train a recipe on SLURM (submitit), locally (--local), or print the plan (--dry-run).",
        epilog=f"Testing hook: {ENTRY_ENV}=module:function replaces the trainer entry.",
    )
    parser.add_argument("recipe", help="recipe YAML (a sweep recipe with --sweep)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="recipe overrides, value parsed as YAML (e.g. train.lr=3e-4 parallel.tp=2)",
    )
    parser.add_argument("--local", action="store_true", help="run on this machine (submitit LocalExecutor)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="--local: processes (ranks); default tp*pp (x what ep needs), or one per GPU",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved recipe, derived numbers and sbatch script; submit nothing",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="SLURM: follow the job (a sweep: each run) until it ends; exit 1 if a rank failed",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="RECIPE is a sweep file (recipes/sweeps/): one job array of runs, or sequential with --local",
    )
    parser.add_argument(
        "--stop-after",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="--sweep --local: stop within this many seconds: no run starts with less than "
        "--start-margin left, the running one is sent SIGTERM (saves, stops); exit 3 if runs are left",
    )
    parser.add_argument(
        "--start-margin",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="--stop-after: the least time left for a run to start (default 60)",
    )
    parser.add_argument(
        "--concurrent",
        type=_positive,
        default=None,
        metavar="N",
        help="--sweep --local: up to N runs at a time, each on its own rendezvous port, all sharing "
        "this machine's GPUs (a run's tokens/s then measures a shared GPU) and CPUs (default 1)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print every valid parallel layout on --gpus GPUs (TP x CP x PP x EP), each at its "
        "fastest fitting micro-batch and recompute mode, with predicted memory, step time, tokens/s, "
        "MFU and whether it fits, best first, the recipe's own configuration marked; submit nothing",
    )
    parser.add_argument(
        "--gpus", type=int, default=None, help="--plan: GPUs (default the recipe's world size)"
    )
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GiB",
        help="--plan / --dry-run: memory per GPU (default the recipe's GPU type's, else 80)",
    )
    return parser


def _seconds(text: str) -> float:
    """A non-negative number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (>= 0)")
    return value


def _positive(text: str) -> int:
    """A whole number >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def plan(recipe: Any, args: argparse.Namespace) -> int:
    """Print every valid layout of the recipe with its predictions, the best first."""
    from hybrid_megatron.accounting.layout_plan import plan_layouts, render_plan, target_for

    if args.gpus is not None and args.gpus < 1:
        raise UsageError(f"--gpus {args.gpus}: needs at least 1 GPU")
    target = target_for(recipe, args.gpus, args.gpu_memory)
    print(render_plan(plan_layouts(recipe, target), target, f"# plan for {recipe.source}"))
    return 0


def predicted(recipe: Any, world: int, args: argparse.Namespace) -> str:
    """The recipe's layout's prediction on ``world`` GPUs; UsageError when it cannot fit."""
    from hybrid_megatron.accounting.layout_plan import (
        check_fits,
        predict_layout,
        render_prediction,
        target_for,
    )

    target = target_for(recipe, world, args.gpu_memory)
    try:
        prediction = predict_layout(recipe, recipe.parallel, target)
        check_fits(prediction)
    except InputError as err:
        raise UsageError(str(err)) from None
    return render_prediction(prediction)


def dry_run(recipe: Any, args: argparse.Namespace) -> int:
    """Print the resolved recipe, derived numbers and the sbatch script / local plan."""
    overrides = f" with {' '.join(args.overrides)}" if args.overrides else ""
    print(f"# recipe {recipe.source}{overrides}")
    print("# ---- resolved recipe ----")
    print(recipe.to_yaml().rstrip())
    if args.local:
        nproc, gpus = local_world(recipe, args.nproc)
        print(f"# ---- derived ({nproc} ranks) ----")
        print(describe(recipe, nproc))
        if gpus:
            print("# ---- predicted (accounting.layout_plan) ----")
            print(predicted(recipe, nproc, args))
        print("# ---- local run ----")
        print(
            f"# {nproc} processes on {socket.gethostname()} (submitit LocalExecutor), "
            f"{f'{gpus} GPUs' if gpus else 'CPU, gloo'}; logs in {log_folder(recipe, 'local')}"
        )
    else:
        world = recipe.slurm.world_size
        print(
            f"# ---- derived ({world} ranks = {recipe.slurm.nodes} nodes x "
            f"{recipe.slurm.ranks_per_node}) ----"
        )
        print(describe(recipe, world))
        print("# ---- predicted (accounting.layout_plan) ----")
        print(predicted(recipe, world, args))
        print("# ---- sbatch script (submitit) ----")
        print(render_sbatch(recipe).rstrip())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and launch; returns the process exit code (0 ok, 1 job failed, 2 usage)."""
    # Intermixed: overrides may come before or after the flags.
    args = build_parser().parse_intermixed_args(argv)
    runtime.setup()
    try:
        if args.concurrent is not None and not (args.sweep and args.local):
            raise UsageError("--concurrent applies to --sweep --local runs only")
        if args.stop_after is not None and not (args.sweep and args.local):
            raise UsageError("--stop-after applies to --sweep --local runs only (on SLURM: slurm.time)")
        if args.sweep:
            return run_sweep(args, os.environ.get(ENTRY_ENV) or None)
        if args.nproc is not None and not args.local:
            raise UsageError("--nproc applies to --local runs only (on SLURM: slurm.nodes / gpus_per_node)")
        entry = os.environ.get(ENTRY_ENV) or None
        if (args.gpus is not None) and not args.plan:
            raise UsageError("--gpus applies to --plan only (a run's GPUs: slurm.nodes / gpus_per_node)")
        recipe = load(args)
        if args.plan:
            return plan(recipe, args)
        if args.dry_run:
            code = dry_run(recipe, args)
            if code == 0:  # after the printout, so a recipe with placeholder paths still shows its plan
                check_inputs(recipe)
                check_tracking([recipe])
                print("# dry run: nothing submitted")
            return code
        check_inputs(recipe)
        check_tracking([recipe])
        if args.local:
            code = run_local(recipe, args, entry)
            if code == 0:
                print(next_steps(recipe), flush=True)
            return code
        return run_slurm(recipe, args, entry)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
