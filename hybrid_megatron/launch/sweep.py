"""``--sweep``: a sweep file's runs as one SLURM job array (``--wait``: follows each run in turn,
exit 1 if any failed), or with ``--local`` one after another (``--concurrent N``: up to N at a
time, sharing the machine; ``--stop-after``: within a time budget).

A sweep stopped part-way (a time limit, a lost machine) continues when the same command runs
again: finished runs are skipped (see `finished_evidence`: the latest checkpoint at the last
step, or a FINISHED run in the tracking store), the others resume from their latest checkpoint
(``checkpoint.resume: auto``) or start.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import sys
import time
from pathlib import Path

import submitit

from hybrid_megatron.checkpoint_layout import CheckpointError, checkpoint_step, latest_checkpoint
from hybrid_megatron.errors import InputError
from hybrid_megatron.launch.follow import follow, report
from hybrid_megatron.launch.local import STOPPED, LocalRun
from hybrid_megatron.launch.plan import UsageError, check_inputs, check_tracking, local_world
from hybrid_megatron.launch.slurm import render_sbatch, slurm_job_active, submit_slurm

# A sweep under --stop-after that ended with runs left to do (run the same command again).
EXIT_STOPPED = 3


def finished_evidence(recipe, world_size: int, stores: dict | None = None) -> str | None:
    """What shows the run finished, or None when it has not (it runs, or resumes).

    Takes the validated Recipe, the world size it runs at and a cache of the tracking stores
    read so far (``(uri, experiment) -> FinishedRuns``, or the error reading it; filled here).
    Returns ``"checkpoint at step S"`` when the run's latest checkpoint is at its last step S,
    else ``"MLflow run ID at step S"`` when its tracking store (the recipe's URI and experiment)
    holds a FINISHED run of its run name and compare group that logged its last step S (see
    `hybrid_megatron.tracking.finished`); of several such runs the latest. A run stopped
    part-way (MLflow status RUNNING, KILLED or FAILED, or fewer steps) has not finished.

    Always on: checkpoint folders get cleaned (scratch space, a machine lent per session) while
    the store stays, and a FINISHED run of that name, group and length is exactly what
    ``scaling compare`` and ``fit`` read, so running it again would only repeat it (to redo
    one, delete its MLflow run). Checkpoints or a store that cannot be read, or steps that
    cannot be derived, count as no evidence (the run runs and reports the problem).
    """
    from hybrid_megatron.accounting import count_parameters
    from hybrid_megatron.config import derived

    try:
        total_steps = derived(recipe, world_size, count_parameters)["total_steps"]
    except InputError:
        return None
    if _checkpointed_step(recipe) == total_steps:
        return f"checkpoint at step {total_steps}"
    if not recipe.tracking.enabled:
        return None
    runs = _finished_runs(recipe.tracking_uri(), recipe.tracking.experiment, {} if stores is None else stores)
    if runs is None:
        return None
    tracking = recipe.tracking
    try:
        run_id = runs.reached(tracking.run_name or recipe.name, tracking.compare_group, total_steps)
    except Exception as err:  # MLflow's errors are many types; the run then simply runs
        print(f"[sweep] {runs.uri}: cannot read {recipe.name}'s steps ({err}); it runs", flush=True)
        return None
    return None if run_id is None else f"MLflow run {run_id} at step {total_steps}"


def _finished_runs(uri: str, experiment: str, stores: dict):
    """The store's FinishedRuns, read once per sweep; None (reported once) when unreadable."""
    from hybrid_megatron.tracking.finished import FinishedRuns
    from hybrid_megatron.tracking.store import failure_reason

    key = (uri, experiment)
    if key not in stores:
        try:
            stores[key] = FinishedRuns(uri, experiment)
        except Exception as err:  # MLflow's errors are many types; checkpoints still count
            stores[key] = None
            print(
                f"[sweep] tracking store {uri} not read ({failure_reason(err)}): finished runs "
                "are known by their checkpoints only",
                flush=True,
            )
    return stores[key]


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
    """The runs (and recipes) still to do; prints the finished ones it skips, each with what
    showed it finished (see `finished_evidence`)."""
    stores: dict = {}
    evidence = [finished_evidence(recipe, world_size(recipe), stores) for recipe in recipes]
    done = [f"{run.name} ({why})" for run, why in zip(runs, evidence) if why]
    if done:
        print(f"[sweep] {len(done)} runs finished earlier, skipped: {', '.join(done)}", flush=True)
    todo = [i for i, why in enumerate(evidence) if why is None]
    return [runs[i] for i in todo], [recipes[i] for i in todo]


def _checkpointed_step(recipe) -> int | None:
    """The step of the run's latest checkpoint; None without one, or when its checkpoints
    cannot be read."""
    try:
        latest = latest_checkpoint(recipe.checkpoint.dir)
    except (CheckpointError, OSError):
        return None
    return None if latest is None else checkpoint_step(latest)


def _resume_point(recipe) -> str:
    """Where a run left to do starts next time: its latest checkpoint's step, or step 0."""
    step = _checkpointed_step(recipe)
    return "from step 0" if step is None else f"resumes at step {step}"


def _run_local(
    runs: list, recipes: list, args: argparse.Namespace, entry: str | None, deadline: float | None
) -> tuple[int, list]:
    """Run the sweep's runs on this machine, up to ``--concurrent`` at a time (default one after
    another), starting them in the sweep's order as slots free up, each on its own rendezvous
    port with the same GPUs; a failed run does not stop the others. Until ``deadline``
    (``time.monotonic()``) if given: no run starts with less than ``--start-margin`` seconds
    left, and every run going at the deadline is stopped there
    (`hybrid_megatron.launch.local.DeadlineStop`). Prints a line as each run starts and ends.
    Returns the number of failed runs and the (run, recipe) pairs left to do (stopped part-way
    or never started), in the sweep's order."""
    slots = args.concurrent or 1
    waiting = list(range(len(runs)))
    running: dict[int, LocalRun] = {}
    due: dict[int, float] = {}  # when each running run's next poll is due
    began: dict[int, float] = {}
    left: list[int] = []
    failed = 0
    starting = True
    try:
        while running or (starting and waiting):
            while starting and waiting and len(running) < slots:
                if deadline is not None and deadline - time.monotonic() < args.start_margin:
                    print(
                        f"[sweep] {max(0.0, deadline - time.monotonic()):.0f} s left of --stop-after "
                        f"{args.stop_after:g}, less than --start-margin {args.start_margin:g}: no run starts",
                        flush=True,
                    )
                    starting = False
                    break
                i = waiting.pop(0)
                print(
                    f"[sweep] start {runs[i].name} (run {i + 1} of {len(runs)}, {len(running) + 1} running)",
                    flush=True,
                )
                running[i] = LocalRun.start(
                    recipes[i],
                    args,
                    entry,
                    deadline,
                    taken_ports={run.port for run in running.values()},
                    sharing=slots,
                    prefix="[rank0] " if slots == 1 else f"[{runs[i].name}] ",
                )
                due[i], began[i] = 0.0, time.monotonic()
            try:
                for i in sorted(running):
                    if due[i] > time.monotonic():
                        continue
                    try:
                        due[i] = time.monotonic() + next(running[i].steps)
                    except StopIteration as end:
                        outcome = _outcome(recipes[i], end.value, running.pop(i).nproc)
                        failed += outcome.startswith("FAILED")
                        if outcome.startswith("stopped"):
                            left.append(i)
                        _print_end(runs[i], outcome, began[i])
                if running:
                    time.sleep(min(max(0.0, min(due[i] for i in running) - time.monotonic()), 0.5))
            except KeyboardInterrupt:
                for i in sorted(running):
                    running.pop(i).interrupted()
                    failed += 1
                    _print_end(runs[i], "interrupted (cancelled)", began[i])
    finally:  # a run that could not start (or the launcher's own error) ends the others too
        for run in running.values():
            run.cancel()
    return failed, [(runs[i], recipes[i]) for i in sorted(left + waiting)]


def _outcome(recipe, code: int, world: int) -> str:
    """How a run ended, from its `LocalRun` exit code: ``succeeded``, ``FAILED (exit C)`` or
    ``stopped at the time budget, <resume point>`` (a run stopped at its last step succeeded)."""
    if code == STOPPED and finished_evidence(recipe, world) is None:
        return f"stopped at the time budget, {_resume_point(recipe)}"
    return "succeeded" if code in (0, STOPPED) else f"FAILED (exit {code})"


def _print_end(run, outcome: str, began: float) -> None:
    print(f"[sweep] end {run.name}: {outcome} after {time.monotonic() - began:.0f} s", flush=True)


def run_sweep(args: argparse.Namespace, entry: str | None) -> int:
    """Expand a sweep file into runs; check every run's inputs and tracking server; print their
    table; then (unless --dry-run) submit one SLURM job array, or with --local run them one
    after another (``--concurrent N``: up to N at a time; ``--stop-after``: within that many
    seconds from now). Returns the exit code
    (``EXIT_STOPPED`` when ``--stop-after`` left runs to do)."""
    from hybrid_megatron.config import load_recipe
    from hybrid_megatron.scaling.sweep import format_sweep_table, load_sweep, next_steps

    started = time.monotonic()
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
        deadline = None if args.stop_after is None else started + args.stop_after
        if (args.concurrent or 1) > 1:
            print(
                f"[sweep] up to {args.concurrent} runs at a time, sharing this machine's GPUs and "
                "CPUs: a run's tokens/s and MFU measure a shared GPU (its losses do not depend on it)",
                flush=True,
            )
        failed, left = _run_local(runs, recipes, args, entry, deadline)
        ran = len(runs) - len(left)
        print(f"[sweep] {ran - failed}/{ran} runs succeeded (compare group {spec.name})")
        if left:
            print(
                f"[sweep] stopped by --stop-after {args.stop_after:g}: {len(left)} of {len(all_runs)} "
                "runs left to do: "
                + ", ".join(f"{run.name} ({_resume_point(recipe)})" for run, recipe in left)
                + "; run the same command again to continue",
                flush=True,
            )
            return 1 if failed else EXIT_STOPPED
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
