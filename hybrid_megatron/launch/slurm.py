"""SLURM: the recipe's ``slurm:`` section as sbatch options, submission through submitit, ``--wait``.

One job through submitit's AutoExecutor (cluster ``slurm``) with one task per GPU across
``slurm.nodes x slurm.gpus_per_node`` (``slurm.tasks_per_node`` overrides the count, e.g. on
CPU-only clusters); the launcher prints the job id and log paths and returns (``--wait``:
follows rank 0's log until the job ends and exits non-zero if a rank failed). Logs go to
``<run dir>/slurm/<job id>/``, the run dir being the parent of ``checkpoint.dir``. Before
submitting, a SQLite MLflow store (the default) and its experiment are created under the
store's lock, so that jobs starting together (a sweep's array tasks) find them ready; a new experiment keeps
its artifacts beside the database (``mlartifacts/``), not in the jobs' working directory.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import submitit

from hybrid_megatron.launch.follow import follow, report
from hybrid_megatron.launch.job import TrainJob
from hybrid_megatron.launch.plan import UsageError, describe, log_folder

SLURM_ACTIVE_STATES = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
    "SPECIAL_EXIT",
}


def slurm_parameters(recipe: Any) -> dict:
    """The recipe's ``slurm:`` section as submitit SlurmExecutor parameters (sbatch options).

    Takes a Recipe; returns a dict for ``SlurmExecutor.update_parameters`` /
    ``_make_sbatch_string``: one task per rank, env exported in the setup lines, pyxis container
    flags and ``--kill-on-bad-exit`` on srun, ``--requeue`` so preempted jobs can come back.
    """
    s = recipe.slurm
    params: dict = {
        "job_name": s.job_name or recipe.name,
        "time": s.time,
        "nodes": s.nodes,
        "ntasks_per_node": s.ranks_per_node,
        "signal_delay_s": s.signal_delay_s,
        "array_parallelism": s.array_parallelism,
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.cpus_per_task:
        params["cpus_per_task"] = s.cpus_per_task
    if s.mem_gb is not None:
        # sbatch --mem=0 means "all of the node's memory"; submitit would write "0GB".
        params["mem"] = (
            "0"
            if s.mem_gb == 0
            else (f"{int(s.mem_gb)}GB" if s.mem_gb == int(s.mem_gb) else f"{int(s.mem_gb * 1024)}MB")
        )
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(s, key)
        if value:
            params[key] = value
    if s.exclusive:
        params["exclusive"] = True
    setup = [f"export {key}={shlex.quote(value)}" for key, value in s.env.items()] + list(s.setup)
    if setup:
        params["setup"] = setup
    # One failed rank ends the step instead of leaving the others hung in a collective.
    srun_args = ["--kill-on-bad-exit=1"]
    if s.container_image:
        srun_args.append(f"--container-image={s.container_image}")
    if s.container_mounts:
        srun_args.append(f"--container-mounts={','.join(s.container_mounts)}")
    params["srun_args"] = srun_args + list(s.srun_extra)
    params["additional_parameters"] = {"requeue": True, **s.sbatch_extra}
    return params


def render_sbatch(recipe: Any, array_size: int | None = None, python: str | None = None) -> str:
    """The sbatch script submitit would submit for ``recipe`` (no SLURM needed to render it).

    Takes the Recipe, optionally the job-array size (sweeps) and the python command; returns
    the script text, made by submitit's own ``_make_sbatch_string``.
    """
    from submitit.slurm.slurm import _make_sbatch_string

    folder = log_folder(recipe, "slurm")
    python = python or shlex.quote(sys.executable)
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = slurm_parameters(recipe)
    if array_size is not None:
        params["map_count"] = array_size
    return _make_sbatch_string(command=command, folder=folder, **params)


def submit_slurm(recipes: Sequence[Any], entry: str | None) -> list:
    """Submit one SLURM job per recipe (several: one job array); returns the submitit jobs.

    All recipes share the first one's slurm section and log folder (a sweep's runs differ in
    model/train settings, not in allocation).
    """
    first = recipes[0]
    executor = submitit.AutoExecutor(
        folder=log_folder(first, "slurm"), cluster="slurm", slurm_max_num_timeout=first.slurm.max_timeouts
    )
    executor.update_parameters(**{f"slurm_{k}": v for k, v in slurm_parameters(first).items()})
    prepare_tracking(recipes)
    if len(recipes) == 1:
        return [executor.submit(TrainJob(first, entry))]
    with executor.batch():
        jobs = [executor.submit(TrainJob(recipe, entry)) for recipe in recipes]
    return jobs


def prepare_tracking(recipes: Sequence[Any]) -> None:
    """Create the SQLite MLflow store and the experiment of each recipe before its jobs start.

    The store is opened under its lock (`hybrid_megatron.tracking.store.open_store`), as every
    job's tracker opens it; created once here, it is ready when a sweep's array tasks start. A
    new experiment's artifacts go to ``mlartifacts/`` beside the database. Recipes with tracking
    off or a non-SQLite tracking URI are left alone; a failure is printed as a warning (the jobs
    spool their records and may still manage), never raised.
    """
    from hybrid_megatron.tracking.store import open_store, sqlite_path

    done = set()
    for recipe in recipes:
        uri, experiment = recipe.tracking_uri(), recipe.tracking.experiment
        if not recipe.tracking.enabled or sqlite_path(uri) is None or (uri, experiment) in done:
            continue
        done.add((uri, experiment))
        try:
            open_store(uri, experiment)
        except Exception as err:  # MLflow raises many types; tracking must not block a launch
            print(f"[launch] warning: could not prepare the MLflow store {uri}: {err}", file=sys.stderr)


def slurm_job_active(job_id: str) -> bool:
    """Whether SLURM still lists the job as pending/running (squeue); False once it has ended."""
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: keep waiting rather than declare a running job dead
    states = {line.strip() for line in proc.stdout.splitlines() if line.strip()}
    return bool(states & SLURM_ACTIVE_STATES)


def run_slurm(recipe: Any, args: argparse.Namespace, entry: str | None) -> int:
    """Submit the job to SLURM; with --wait follow it to the end. Returns the exit code."""
    if shutil.which("sbatch") is None:
        raise UsageError(
            "SLURM was not found on this machine (no 'sbatch' on PATH). To run here, add --local "
            f"(python launch/slurm.py {args.recipe} --local); --dry-run prints the sbatch script "
            "without submitting."
        )
    world = recipe.slurm.world_size
    print(
        f"[launch] {recipe.name}: {recipe.slurm.nodes} nodes x {recipe.slurm.ranks_per_node} tasks "
        f"= {world} ranks"
    )
    print(describe(recipe, world), flush=True)
    try:
        (job,) = submit_slurm([recipe], entry)
    except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError) as err:
        print(f"[launch] sbatch failed: {err}", file=sys.stderr)
        return 1
    rank0 = job.task(0) if world > 1 else job
    print(f"[launch] submitted SLURM job {job.job_id} ({recipe.slurm.job_name or recipe.name})")
    print(f"[launch]   rank 0 log: {rank0.paths.stdout}")
    print(f"[launch]   rank 0 err: {rank0.paths.stderr}")
    print(f"[launch]   all ranks:  {job.paths.folder}/{job.job_id}_<rank>_log.{{out,err}}")
    print(f"[launch]   cancel:     scancel {job.job_id}", flush=True)
    if not args.wait:
        return 0
    outcomes = follow(
        job,
        world,
        is_active=lambda: slurm_job_active(job.job_id),
        cancel=lambda: subprocess.run(["scancel", str(job.job_id)], check=False),
        failure_grace_s=60.0,
        poll_s=1.0,
        settle_s=60.0,
    )
    return report(job, world, outcomes)
