"""``--sweep``: a sweep file's runs as one SLURM job array (``--wait``: follows each run in turn,
exit 1 if any failed), or with ``--local`` one after another.

A sweep stopped part-way (a time limit, a lost machine) continues when the same command runs
again: runs whose latest checkpoint is at their last step are skipped, the others resume from
their latest checkpoint (``checkpoint.resume: auto``) or start.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import sys
from pathlib import Path

import submitit

from hybrid_megatron.checkpoint_layout import CheckpointError, checkpoint_step, latest_checkpoint
from hybrid_megatron.errors import InputError
from hybrid_megatron.launch.follow import follow, report
from hybrid_megatron.launch.local import run_local
from hybrid_megatron.launch.plan import UsageError, check_inputs, check_tracking, local_world
from hybrid_megatron.launch.slurm import render_sbatch, slurm_job_active, submit_slurm


def is_finished(recipe, world_size: int) -> bool:
    """Whether the run's latest checkpoint is at its last step (an earlier sweep finished it).

    Takes the validated Recipe and the world size it runs at. A run whose checkpoints cannot be
    read or whose steps cannot be derived counts as unfinished (it runs and reports the problem).
    """
    from hybrid_megatron.accounting import count_parameters
    from hybrid_megatron.config import derived

    try:
        latest = latest_checkpoint(recipe.checkpoint.dir)
        total_steps = derived(recipe, world_size, count_parameters)["total_steps"]
    except (CheckpointError, InputError, OSError):
        return False
    return latest is not None and checkpoint_step(latest) == total_steps


def _check_inputs(runs: list, recipes: list) -> None:
    """check_inputs for every run before anything is submitted, each distinct set of inputs once;
    the UsageError names the sweep run as well as the input."""
    checked = set()
    for run, recipe in zip(runs, recipes):
        data, ckpt = recipe.data, recipe.checkpoint
        inputs = (data.tokenizer, tuple(data.prefixes()), ckpt.resume, ckpt.dir, ckpt.init_from)
        if inputs in checked:
            continue
        checked.add(inputs)
        try:
            check_inputs(recipe)
        except UsageError as err:
            raise UsageError(f"sweep run {run.name}: {err}") from None


def _skip_finished(runs: list, recipes: list, world_size) -> tuple[list, list]:
    """The runs (and recipes) still to do; prints the finished ones it skips."""
    finished = [is_finished(recipe, world_size(recipe)) for recipe in recipes]
    done = [run.name for run, skip in zip(runs, finished) if skip]
    if done:
        print(f"[sweep] {len(done)} runs finished earlier, skipped: {', '.join(done)}", flush=True)
    todo = [i for i, skip in enumerate(finished) if not skip]
    return [runs[i] for i in todo], [recipes[i] for i in todo]


def run_sweep(args: argparse.Namespace, entry: str | None) -> int:
    """Expand a sweep file into runs; check every run's inputs and tracking server; print their
    table; then (unless --dry-run) submit one SLURM job array, or with --local run them one
    after another. Returns the exit code."""
    from hybrid_megatron.config import load_recipe
    from hybrid_megatron.scaling.sweep import format_sweep_table, load_sweep, next_steps

    try:
        spec, runs = load_sweep(args.recipe, tuple(args.overrides))
        recipes = [load_recipe(run.recipe_path, run.overrides) for run in runs]
    except InputError as err:
        raise UsageError(str(err)) from None
    if not args.dry_run:
        _check_inputs(runs, recipes)
        check_tracking(recipes)
    print(format_sweep_table(spec, runs), flush=True)
    stores = list(dict.fromkeys((r.tracking_uri(), r.tracking.experiment) for r in recipes))
    out_dir = str(Path(recipes[0].run_dir).parent)  # <runs>/<sweep name>, beside the runs
    if args.dry_run:
        print("# ---- sbatch script of the job array (submitit) ----")
        print(render_sbatch(recipes[0], array_size=len(recipes)).rstrip())
        print("# after the runs, " + next_steps(spec, runs, stores, out_dir).replace("\n", "\n# "))
        # after the printout, as for one run: a sweep with placeholder paths still shows its plan
        _check_inputs(runs, recipes)
        check_tracking(recipes)
        print("# dry run: nothing submitted")
        return 0
    all_runs = runs
    if args.local:
        runs, recipes = _skip_finished(runs, recipes, lambda recipe: local_world(recipe, args.nproc)[0])
        failed = 0
        for run, recipe in zip(runs, recipes):
            print(f"[sweep] {run.name}", flush=True)
            failed += run_local(recipe, args, entry) != 0
        print(f"[sweep] {len(runs) - failed}/{len(runs)} runs succeeded (compare group {spec.name})")
        print(next_steps(spec, all_runs, stores, out_dir), flush=True)
        return 1 if failed else 0
    if shutil.which("sbatch") is None:
        raise UsageError("SLURM was not found on this machine (no 'sbatch' on PATH); add --local")
    runs, recipes = _skip_finished(runs, recipes, lambda recipe: recipe.slurm.world_size)
    if not runs:
        print(next_steps(spec, all_runs, stores, out_dir), flush=True)
        return 0
    try:
        jobs = submit_slurm(recipes, entry)
    except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError) as err:
        print(f"[sweep] sbatch failed: {err}", file=sys.stderr)
        return 1
    print(
        f"[sweep] submitted job array {jobs[0].job_id.split('_')[0]} with {len(jobs)} runs "
        f"(compare group {spec.name})",
        flush=True,
    )
    for run, job in zip(runs, jobs):
        print(f"[sweep]   {job.job_id}: {run.name}", flush=True)
    if not args.wait:
        print("once they have finished, " + next_steps(spec, all_runs, stores, out_dir), flush=True)
        return 0
    world = recipes[0].slurm.world_size  # the array's tasks share the first recipe's allocation
    failed = 0
    for run, job in zip(runs, jobs):
        print(f"[sweep] following {run.name} (job {job.job_id})", flush=True)
        outcomes = follow(
            job,
            world,
            is_active=functools.partial(slurm_job_active, job.job_id),
            cancel=functools.partial(subprocess.run, ["scancel", str(job.job_id)], check=False),
            failure_grace_s=60.0,
            poll_s=1.0,
            settle_s=60.0,
        )
        failed += report(job, world, outcomes) != 0
    print(f"[sweep] {len(runs) - failed}/{len(runs)} runs succeeded (compare group {spec.name})")
    print(next_steps(spec, all_runs, stores, out_dir), flush=True)
    return 1 if failed else 0
