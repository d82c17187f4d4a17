#!/usr/bin/env python
"""Launch a training recipe on SLURM, on this machine, or print what would be launched.

    python launch/slurm.py RECIPE [key.path=value ...] [--local [--nproc N]] [--dry-run]
                                  [--wait] [--sweep]

SLURM (default): submits one job through submitit's AutoExecutor (cluster ``slurm``) with one
task per GPU across ``slurm.nodes x slurm.gpus_per_node`` (``slurm.tasks_per_node`` overrides
the count, e.g. on CPU-only clusters), prints the job id and log paths, and returns (``--wait``:
follows rank 0's log until the job ends and exits non-zero if a rank failed). Logs go to
``<run dir>/slurm/<job id>/``, the run dir being the parent of ``checkpoint.dir``. Before
submitting, a SQLite MLflow store (the default) and its experiment are created, so that jobs
starting together (a sweep's array tasks) do not race to create them; a new experiment keeps
its artifacts beside the database (``mlartifacts/``), not in the jobs' working directory.
``--sweep``: RECIPE is a sweep file; its runs are one job array (``--wait``: follows each run
in turn, exit 1 if any failed), or with ``--local`` run one after another.
``--local``: the same job through submitit's LocalExecutor, ``--nproc`` processes on this
machine (default: the smallest world size the recipe's tp/pp/ep fit, or one per GPU of the
recipe's ``gpus_per_node`` when CUDA is present); waits, streams rank 0's log, and exits 1
with the failing rank's error if any rank fails. ``--dry-run``: prints the resolved recipe, the
derived quantities and the sbatch script (or the local plan); submits nothing.

Each task runs `TrainJob`: it derives MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK
(and LOCAL_WORLD_SIZE, NODE_RANK) from ``submitit.JobEnvironment()``, exports them, sets the
process up (``hybrid_megatron.runtime.setup``) and calls the trainer entry
``hybrid_megatron.training.entry:train(recipe)``, which initialises torch.distributed from them
(gloo on CPU, nccl on GPU). A rank that stops on bad input (any ``InputError``: recipe, data,
tokenizer, checkpoint) is reported by its one-line message; other failures by their traceback.
Testing/debugging hook: the environment variable ``HM_TRAIN_ENTRY=module:function`` or
``HM_TRAIN_ENTRY=/path/to/file.py:function``, read when the launcher starts, replaces the
trainer entry (it is called with the Recipe).

Preemption and time limits: sbatch asks SLURM for SIGUSR2 ``slurm.signal_delay_s`` seconds
before the limit (submitit's preemption signal). `PreemptionBridge` hands it to the trainer's
SIGUSR1 handler (save at the step boundary, then return); once the trainer has returned, rank 0
runs submitit's handler, which calls ``TrainJob.checkpoint()`` (a fresh TrainJob with
``checkpoint.resume: auto``) and requeues the job (``scontrol requeue``); the requeued job
resumes from the checkpoint just written. On preemption SLURM sends SIGTERM, which the trainer
handles itself; ``--requeue`` lets SLURM put the job back in the queue.

Exit codes: 0 success (or submitted), 1 a rank or the job failed, 2 bad usage / recipe / no
SLURM.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import submitit
from submitit.core.utils import pickle_load
from submitit.helpers import Checkpointable, DelayedSubmission

from hybrid_megatron import runtime
from hybrid_megatron.errors import InputError

ENTRY_ENV = "HM_TRAIN_ENTRY"
DEFAULT_ENTRY = "hybrid_megatron.training.entry:train"
SLURM_ACTIVE_STATES = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT",
}
SUMMARY_KEYS = ("checkpoint_dir", "last_checkpoint", "final_loss", "mlflow_run_id")


class UsageError(InputError):
    """A problem with the command line or the recipe: printed as one line, exit code 2."""


# The last line of a rank's traceback when its entry stopped on bad input, followed by the
# error's class name and message as JSON (one line whatever the message holds).
INPUT_ERROR_MARK = "[input error] "


class RankInputError(Exception):
    """Raised by a rank whose entry raised an InputError, to hand its message to the launcher.

    A rank's outcome reaches the launcher only as traceback text; this exception's message (the
    traceback's last line) carries the original error in a form `input_error_line` reads back.
    """

    def __init__(self, error: InputError) -> None:
        super().__init__(INPUT_ERROR_MARK + json.dumps({"error": type(error).__name__, "message": str(error)}))


# ----------------------------------------------------------------------------- per-rank side


def resolve_entry(spec: str) -> Callable[[Any], Any]:
    """Import the trainer entry named ``module:function`` or ``/path/to/file.py:function``.

    Returns the callable; raises ValueError for a malformed spec, ImportError/AttributeError
    when it cannot be found.
    """
    target, sep, func = spec.rpartition(":")
    if not sep or not target or not func:
        raise ValueError(f"{ENTRY_ENV}: expected module:function or file.py:function, got {spec!r}")
    if target.endswith(".py") or os.sep in target:
        path = Path(target).expanduser().resolve()
        module_spec = importlib.util.spec_from_file_location(f"hm_entry_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"{ENTRY_ENV}: cannot load {path}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, func)


def slurm_master_port(job_id: str) -> int:
    """A rendezvous port every task of a SLURM job computes alike from its job id (20000-39999)."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def rendezvous_env(job_env: Any, master_port: Optional[int] = None) -> dict:
    """The torch.distributed variables of this task, from a submitit JobEnvironment.

    Takes the JobEnvironment and an explicit port (local runs pick a free one; SLURM jobs derive
    it from the job id unless ``HM_MASTER_PORT`` is set). Returns MASTER_ADDR, MASTER_PORT,
    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and NODE_RANK as strings.
    """
    if job_env.cluster == "local":
        master_addr = "127.0.0.1"
    else:
        master_addr = job_env.hostnames[0]
    if master_port is None:
        master_port = int(os.environ.get("HM_MASTER_PORT") or slurm_master_port(job_env.raw_job_id))
    num_nodes = max(1, job_env.num_nodes)
    return {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(max(1, job_env.num_tasks // num_nodes)),
        "NODE_RANK": str(job_env.node),
    }


class PreemptionBridge:
    """Routes submitit's preemption signal (SIGUSR2, sent by SLURM ``signal_delay_s`` before the
    time limit) to the trainer's graceful stop, and requeues only after the trainer returned.

    submitit's own handler would requeue and exit rank 0 at once, mid-step, without a save.
    Instead, when the signal arrives and the entry has a SIGUSR1 handler installed (the trainer's
    save-and-stop), that handler is called; after the entry returns, `hand_over` calls
    submitit's handler (requeue). Without such a handler submitit's runs right away, as usual.
    """

    def __init__(self) -> None:
        self.signum = submitit.JobEnvironment._usr_sig()
        self.previous: Any = None
        self.deferred = False
        self.frame: Any = None
        self.installed = False

    def install(self) -> "PreemptionBridge":
        """Take over the preemption signal (main thread only; elsewhere a no-op). Returns self."""
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(self.signum, self._on_signal)
            self.installed = True
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        trainer = signal.getsignal(signal.SIGUSR1)
        if callable(trainer) and not self.deferred:
            self.deferred, self.frame = True, frame
            print(f"[launch] {signal.Signals(signum).name}: asking the trainer to checkpoint and stop; "
                  "the job is requeued after it returns", flush=True)
            trainer(signal.SIGUSR1, frame)
        elif callable(self.previous):
            self.previous(signum, frame)

    def uninstall(self) -> None:
        """Put submitit's handler back."""
        if self.installed:
            signal.signal(self.signum, self.previous)
            self.installed = False

    def hand_over(self) -> None:
        """Call submitit's handler for the deferred signal (rank 0: checkpoint() + requeue + exit)."""
        if callable(self.previous):
            self.previous(self.signum, self.frame)


class TrainJob(Checkpointable):
    """The callable every task runs: set the rendezvous environment, call the trainer entry.

    Holds the validated Recipe, the entry spec (None: ``HM_TRAIN_ENTRY`` at run time, else the
    trainer) and, for local runs, the rendezvous port. Calling it returns whatever the entry
    returns (the trainer's summary dict). As a submitit Checkpointable it is requeued on
    preemption/timeout; see `checkpoint`.
    """

    def __init__(self, recipe: Any, entry: Optional[str] = None, master_port: Optional[int] = None,
                 threads: Optional[int] = None) -> None:
        self.recipe = recipe
        self.entry = entry
        self.master_port = master_port
        self.threads = threads

    def __call__(self) -> Any:
        """Run this task: export RANK & co. (see `rendezvous_env`), set the process up
        (``runtime.setup``), then ``entry(recipe)``.

        While the entry runs, submitit's preemption signal is routed through `PreemptionBridge`
        so the trainer checkpoints before the job is requeued. An InputError of the entry is
        raised again as `RankInputError`, which the launcher reports by its message.
        """
        env = rendezvous_env(submitit.JobEnvironment(), self.master_port)
        os.environ.update(env)
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if threads:
            # Ranks sharing a node must not each use every core (oversubscription is far slower).
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        runtime.setup()
        spec = self.entry or os.environ.get(ENTRY_ENV) or DEFAULT_ENTRY
        print(
            f"[launch] rank {env['RANK']}/{env['WORLD_SIZE']} (local {env['LOCAL_RANK']}) on "
            f"{socket.gethostname()}, master {env['MASTER_ADDR']}:{env['MASTER_PORT']}, entry {spec}",
            flush=True,
        )
        entry = resolve_entry(spec)
        bridge = PreemptionBridge().install()
        try:
            result = entry(self.recipe)
        except InputError as err:
            raise RankInputError(err) from err
        finally:
            bridge.uninstall()
        finished = isinstance(result, dict) and "stopped_by_signal" in result and not result["stopped_by_signal"]
        if bridge.deferred and not finished:
            # The trainer has saved and returned: now let submitit requeue (rank 0 calls
            # self.checkpoint(), runs scontrol requeue and exits; other ranks just return).
            bridge.hand_over()
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on rank 0 at preemption/timeout: the requeued job's callable.

        Returns a DelayedSubmission of a new TrainJob whose recipe has ``checkpoint.resume:
        auto``, so the requeued job continues from the latest checkpoint in ``checkpoint.dir``
        (even if this run started from an explicit path or from scratch).
        """
        ckpt = self.recipe.checkpoint.model_copy(update={"resume": "auto"})
        recipe = self.recipe.model_copy(update={"checkpoint": ckpt})
        return DelayedSubmission(TrainJob(recipe, self.entry, self.master_port, self.threads))


# ----------------------------------------------------------------------------- submission side


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
        params["mem"] = "0" if s.mem_gb == 0 else (
            f"{int(s.mem_gb)}GB" if s.mem_gb == int(s.mem_gb) else f"{int(s.mem_gb * 1024)}MB"
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


def log_folder(recipe: Any, kind: str) -> Path:
    """``<run dir>/<kind>/%j``: submitit's folder for this recipe's jobs (kind: slurm or local)."""
    return Path(recipe.run_dir) / kind / "%j"


def render_sbatch(recipe: Any, array_size: Optional[int] = None, python: Optional[str] = None) -> str:
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


def _pickle_this_module_by_value() -> None:
    # Tasks unpickle TrainJob in a fresh interpreter where this file is not importable by name
    # (it is a script, or a test loaded it under another name): ship its code with the pickle.
    # As __main__, cloudpickle already does so.
    if __name__ != "__main__" and __name__ in sys.modules:
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])


def submit_slurm(recipes: Sequence[Any], entry: Optional[str]) -> list:
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
    _pickle_this_module_by_value()
    if len(recipes) == 1:
        return [executor.submit(TrainJob(first, entry))]
    with executor.batch():
        jobs = [executor.submit(TrainJob(recipe, entry)) for recipe in recipes]
    return jobs


SQLITE_PREFIX = "sqlite:///"


def prepare_tracking(recipes: Sequence[Any]) -> None:
    """Create the SQLite MLflow store and the experiment of each recipe before its jobs start.

    Jobs that open a fresh SQLite store at the same time (a sweep's array tasks) race in
    MLflow's schema migration and fail ("duplicate column name"); created once here, the store
    is ready when they start. A new experiment's artifacts go to ``mlartifacts/`` beside the
    database. Recipes with tracking off or a non-SQLite tracking URI are left alone; a failure
    is printed as a warning (the jobs may still manage), never raised.
    """
    done = set()
    for recipe in recipes:
        uri, experiment = recipe.tracking_uri(), recipe.tracking.experiment
        if not recipe.tracking.enabled or not uri.startswith(SQLITE_PREFIX) or (uri, experiment) in done:
            continue
        done.add((uri, experiment))
        try:
            from mlflow.tracking import MlflowClient

            database = Path(uri[len(SQLITE_PREFIX):])
            database.parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=uri)
            if client.get_experiment_by_name(experiment) is None:
                client.create_experiment(experiment, artifact_location=str(database.parent.resolve() / "mlartifacts"))
        except Exception as err:  # MLflow raises many types; tracking must not block a launch
            print(f"[launch] warning: could not prepare the MLflow store {uri}: {err}", file=sys.stderr)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def submit_local(recipe: Any, nproc: int, entry: Optional[str], gpus: int = 0) -> Any:
    """Start the job on this machine through submitit's LocalExecutor; returns the submitit job.

    ``nproc`` processes (one per rank), ``gpus`` of them visible (0 on CPU), the recipe's
    ``slurm.env`` exported, ``slurm.time`` as the time limit (USR2 ``signal_delay_s`` before it,
    as on SLURM). ``slurm.setup`` lines are cluster-specific and not run here.
    """
    executor = submitit.LocalExecutor(folder=log_folder(recipe, "local"), max_num_timeout=recipe.slurm.max_timeouts)
    executor.update_parameters(
        tasks_per_node=nproc,
        gpus_per_node=gpus,
        timeout_min=recipe.slurm.time,
        signal_delay_s=min(recipe.slurm.signal_delay_s, max(1, recipe.slurm.time * 60 // 2)),
    )
    threads = max(1, (os.cpu_count() or 1) // nproc)
    # The controller copies this process's environment into every task.
    saved = dict(os.environ)
    os.environ.update(recipe.slurm.env)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        _pickle_this_module_by_value()
        return executor.submit(TrainJob(recipe, entry, master_port=free_port(), threads=threads))
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ----------------------------------------------------------------------------- following a job


class LogFollower:
    """Prints what is appended to some log files, each line prefixed (``[rank0] ...``)."""

    def __init__(self, paths: Sequence[Path], prefix: str, out=None) -> None:
        self.paths = list(paths)
        self.prefix = prefix
        self.offsets = {p: 0 for p in self.paths}
        self.partial = {p: "" for p in self.paths}
        self.out = out or sys.stdout

    def poll(self, final: bool = False) -> None:
        """Print complete new lines (and, when ``final``, any unterminated last line)."""
        for path in self.paths:
            try:
                with open(path, "r", errors="replace") as handle:
                    handle.seek(self.offsets[path])
                    chunk = handle.read()
                    self.offsets[path] = handle.tell()
            except FileNotFoundError:
                continue
            text = self.partial[path] + chunk
            lines = text.split("\n")
            self.partial[path] = lines.pop()
            if final and self.partial[path]:
                lines.append(self.partial[path])
                self.partial[path] = ""
            for line in lines:
                print(f"{self.prefix}{line}", file=self.out, flush=True)


def read_outcome(task: Any) -> Optional[tuple]:
    """A finished task's ``("success", value)`` or ``("error", traceback)``; None if not there yet."""
    path = task.paths.result_pickle
    if not path.exists():
        return None
    for _ in range(3):
        try:
            return pickle_load(path)
        except (EOFError, OSError):  # being written right now
            time.sleep(0.2)
    return None


def slurm_job_active(job_id: str) -> bool:
    """Whether SLURM still lists the job as pending/running (squeue); False once it has ended."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: keep waiting rather than declare a running job dead
    states = {line.strip() for line in proc.stdout.splitlines() if line.strip()}
    return bool(states & SLURM_ACTIVE_STATES)


def follow(job: Any, nproc: int, is_active: Callable[[], bool], cancel: Callable[[], None],
           failure_grace_s: float, poll_s: float = 0.5, settle_s: float = 30.0) -> list:
    """Wait for a job, streaming rank 0's stdout and stderr; returns each rank's outcome.

    Takes the submitit job, its number of tasks, a liveness probe, a cancel function and how
    long the other ranks may keep running after one failed before the job is cancelled (they
    would otherwise hang in a collective), and how long to wait for the job to end once every
    rank has returned. Returns a list with one ``read_outcome`` per rank
    (None for a rank that ended without a result: killed, or cancelled after a peer failed).
    """
    tasks = [job.task(k) if nproc > 1 else job for k in range(nproc)]
    follower = LogFollower([tasks[0].paths.stdout, tasks[0].paths.stderr], "[rank0] ")
    failed_at: Optional[float] = None
    cancelled = False
    outcomes: list = [None] * nproc
    while True:
        follower.poll()
        outcomes = [outcomes[k] or read_outcome(tasks[k]) for k in range(nproc)]
        if all(o is not None for o in outcomes):
            # Every rank has returned; let the job itself end too (SLURM marks it COMPLETED
            # once the batch script exits), so callers see a finished job.
            deadline = time.time() + settle_s
            while time.time() < deadline and is_active():
                time.sleep(poll_s)
            break
        if failed_at is None and any(o is not None and o[0] == "error" for o in outcomes):
            failed_at = time.time()
        if failed_at is not None and not cancelled and time.time() - failed_at > failure_grace_s:
            cancel()
            cancelled = True
        if not is_active():
            # The job has ended; give the file system a moment to show the last results.
            deadline = time.time() + 3
            while time.time() < deadline and not all(o is not None for o in outcomes):
                time.sleep(0.2)
                outcomes = [outcomes[k] or read_outcome(tasks[k]) for k in range(nproc)]
            break
        time.sleep(poll_s)
    follower.poll(final=True)
    return outcomes


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def input_error_line(traceback_text: str) -> Optional[str]:
    """``"Name: message"`` when a rank stopped on bad input (a `RankInputError`), else None.

    Bad input (recipe, model, data, tokenizer, checkpoint) has a message that names the
    problem, so the report shows it instead of the traceback (which stays in the rank's log).
    """
    lines = traceback_text.strip().splitlines()
    _, mark, payload = (lines[-1] if lines else "").partition(INPUT_ERROR_MARK)
    if not mark:
        return None
    try:
        error = json.loads(payload)
        return f"{error['error']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return None


def report(job: Any, nproc: int, outcomes: list) -> int:
    """Print the end of a followed job: rank 0's summary, or each failed rank's error. Returns the exit code."""
    failed = [k for k, o in enumerate(outcomes) if o is None or o[0] != "success"]
    if not failed:
        print(f"[launch] job {job.job_id}: all {nproc} ranks finished")
        summary = outcomes[0][1]
        if isinstance(summary, dict):
            for key in SUMMARY_KEYS + tuple(k for k in summary if k not in SUMMARY_KEYS):
                if key in summary:
                    print(f"[launch]   {key}: {summary[key]}")
        return 0
    def task(k: int) -> Any:
        return job.task(k) if nproc > 1 else job

    def finished_at(k: int) -> float:
        try:
            return task(k).paths.result_pickle.stat().st_mtime
        except OSError:
            return float("inf")

    # The rank that raised first is the news: the others usually failed because of it (a peer
    # vanished from a collective) or were cancelled after it.
    errors = sorted((k for k in failed if outcomes[k] is not None), key=finished_at)
    if errors:
        first = errors[0]
        brief = input_error_line(outcomes[first][1])
        print(f"[launch] rank {first} failed: {brief}" if brief else
              f"[launch] rank {first} failed:\n{outcomes[first][1]}", file=sys.stderr)
        print(f"[launch] rank {first} logs: {task(first).paths.stdout} {task(first).paths.stderr}",
              file=sys.stderr)
        for k in errors[1:]:
            last = outcomes[k][1].strip().splitlines()[-1] if outcomes[k][1].strip() else "?"
            print(f"[launch] rank {k} failed after rank {first}: {last}", file=sys.stderr)
    for k in failed:
        if outcomes[k] is None:
            print(f"[launch] rank {k} ended without a result (killed, crashed or cancelled); last "
                  f"lines of {task(k).paths.stderr}:\n{_tail(task(k).paths.stderr)}", file=sys.stderr)
    print(f"[launch] job {job.job_id}: FAILED ({len(failed)} of {nproc} ranks)", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="launch/slurm.py",
        description="Train a recipe on SLURM (submitit), locally (--local), or print the plan (--dry-run).",
        epilog=f"Testing hook: {ENTRY_ENV}=module:function (or file.py:function) replaces the trainer entry.",
    )
    parser.add_argument("recipe", help="recipe YAML (a sweep recipe with --sweep)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="recipe overrides, value parsed as YAML (e.g. train.lr=3e-4 parallel.tp=2)")
    parser.add_argument("--local", action="store_true", help="run on this machine (submitit LocalExecutor)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="--local: processes (ranks); default tp*pp (x what ep needs), or one per GPU")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved recipe, derived numbers and sbatch script; submit nothing")
    parser.add_argument("--wait", action="store_true",
                        help="SLURM: follow the job (a sweep: each run) until it ends; exit 1 if a rank failed")
    parser.add_argument("--sweep", action="store_true",
                        help="RECIPE is a sweep file (recipes/sweeps/): one job array of runs, or sequential with --local")
    return parser


def min_world_size(recipe: Any) -> int:
    """The smallest world size the recipe's layout fits: tp*pp*k with (k*tp) % (ep * expert tp) == 0."""
    par = recipe.parallel
    k = par.expert_group_size // math.gcd(par.expert_group_size, par.tp)
    return par.tp * par.pp * k


def local_world(recipe: Any, nproc: Optional[int]) -> tuple[int, int]:
    """(processes, visible GPUs) for a local run; UsageError if ``nproc`` does not fit the layout."""
    import torch

    smallest = min_world_size(recipe)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if nproc is None:
        if gpus:
            wanted = min(recipe.slurm.gpus_per_node or gpus, gpus)
            nproc = max(smallest, wanted // smallest * smallest)
        else:
            nproc = smallest
    if nproc < 1 or nproc % smallest:
        raise UsageError(
            f"--nproc {nproc}: the world size must be a multiple of {smallest} "
            f"(parallel.tp={recipe.parallel.tp} x pp={recipe.parallel.pp}, ep={recipe.parallel.ep}"
            f" x expert tp={recipe.parallel.expert_tensor_parallel})"
        )
    if gpus and nproc > gpus:
        raise UsageError(f"--nproc {nproc}: only {gpus} GPUs on this machine")
    return nproc, (nproc if gpus else 0)


def load(args: argparse.Namespace) -> Any:
    """Load and validate the recipe named on the command line; UsageError with its message."""
    from hybrid_megatron.config import load_recipe

    try:
        return load_recipe(args.recipe, args.overrides)
    except InputError as err:
        raise UsageError(str(err)) from None


def describe(recipe: Any, world_size: int) -> str:
    """The derived-quantities block for ``world_size`` ranks; UsageError if they do not divide."""
    from hybrid_megatron.accounting import count_parameters
    from hybrid_megatron.config import derived, format_derived

    try:
        return format_derived(derived(recipe, world_size, count_parameters))
    except InputError as err:
        raise UsageError(str(err)) from None


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
        print("# ---- local run ----")
        print(f"# {nproc} processes on {socket.gethostname()} (submitit LocalExecutor), "
              f"{'%d GPUs' % gpus if gpus else 'CPU, gloo'}; logs in {log_folder(recipe, 'local')}")
    else:
        world = recipe.slurm.world_size
        print(f"# ---- derived ({world} ranks = {recipe.slurm.nodes} nodes x {recipe.slurm.ranks_per_node}) ----")
        print(describe(recipe, world))
        print("# ---- sbatch script (submitit) ----")
        print(render_sbatch(recipe).rstrip())
    print("# dry run: nothing submitted")
    return 0


def run_local(recipe: Any, args: argparse.Namespace, entry: Optional[str]) -> int:
    """Run the job on this machine and wait; returns the exit code (see `report`)."""
    nproc, gpus = local_world(recipe, args.nproc)
    print(f"[launch] {recipe.name}: {nproc} local ranks ({'%d GPUs' % gpus if gpus else 'CPU'})")
    print(describe(recipe, nproc), flush=True)
    try:
        job = submit_local(recipe, nproc, entry, gpus)
    except OSError as err:  # the run's folders (logs next to the checkpoints) cannot be made
        raise UsageError(f"cannot create {err.filename}: {err.strerror or err} (the run's folders "
                         f"go next to checkpoint.dir {recipe.checkpoint.dir})") from None
    print(f"[launch] local job {job.job_id}; logs in {job.paths.folder}", flush=True)
    try:
        outcomes = follow(job, nproc, is_active=lambda: not job.done(), cancel=lambda: job.cancel(check=False),
                          failure_grace_s=5.0)
    except KeyboardInterrupt:
        job.cancel(check=False)
        print("[launch] interrupted: job cancelled", file=sys.stderr)
        return 130
    return report(job, nproc, outcomes)


def run_slurm(recipe: Any, args: argparse.Namespace, entry: Optional[str]) -> int:
    """Submit the job to SLURM; with --wait follow it to the end. Returns the exit code."""
    if shutil.which("sbatch") is None:
        raise UsageError(
            "SLURM was not found on this machine (no 'sbatch' on PATH). To run here, add --local "
            f"(python launch/slurm.py {args.recipe} --local); --dry-run prints the sbatch script "
            "without submitting."
        )
    world = recipe.slurm.world_size
    print(f"[launch] {recipe.name}: {recipe.slurm.nodes} nodes x {recipe.slurm.ranks_per_node} tasks = {world} ranks")
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
        job, world, is_active=lambda: slurm_job_active(job.job_id),
        cancel=lambda: subprocess.run(["scancel", str(job.job_id)], check=False),
        failure_grace_s=60.0, poll_s=1.0, settle_s=60.0,
    )
    return report(job, world, outcomes)


def run_sweep(args: argparse.Namespace, entry: Optional[str]) -> int:
    """Expand a sweep file into runs; print their table; then (unless --dry-run) submit one
    SLURM job array, or with --local run them one after another. Returns the exit code."""
    from hybrid_megatron.config import load_recipe
    from hybrid_megatron.scaling.sweep import format_sweep_table, load_sweep

    try:
        spec, runs = load_sweep(args.recipe, tuple(args.overrides))
        recipes = [load_recipe(run.recipe_path, run.overrides) for run in runs]
    except InputError as err:
        raise UsageError(str(err)) from None
    print(format_sweep_table(spec, runs), flush=True)
    if args.dry_run:
        print("# ---- sbatch script of the job array (submitit) ----")
        print(render_sbatch(recipes[0], array_size=len(recipes)).rstrip())
        print("# dry run: nothing submitted")
        return 0
    if args.local:
        failed = 0
        for run, recipe in zip(runs, recipes):
            print(f"[sweep] {run.name}", flush=True)
            failed += run_local(recipe, args, entry) != 0
        print(f"[sweep] {len(runs) - failed}/{len(runs)} runs succeeded (compare group {spec.name})")
        return 1 if failed else 0
    if shutil.which("sbatch") is None:
        raise UsageError("SLURM was not found on this machine (no 'sbatch' on PATH); add --local")
    try:
        jobs = submit_slurm(recipes, entry)
    except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError) as err:
        print(f"[sweep] sbatch failed: {err}", file=sys.stderr)
        return 1
    print(f"[sweep] submitted job array {jobs[0].job_id.split('_')[0]} with {len(jobs)} runs "
          f"(compare group {spec.name})", flush=True)
    for run, job in zip(runs, jobs):
        print(f"[sweep]   {job.job_id}: {run.name}", flush=True)
    if not args.wait:
        return 0
    world = recipes[0].slurm.world_size  # the array's tasks share the first recipe's allocation
    failed = 0
    for run, job in zip(runs, jobs):
        print(f"[sweep] following {run.name} (job {job.job_id})", flush=True)
        outcomes = follow(
            job, world, is_active=lambda job=job: slurm_job_active(job.job_id),
            cancel=lambda job=job: subprocess.run(["scancel", str(job.job_id)], check=False),
            failure_grace_s=60.0, poll_s=1.0, settle_s=60.0,
        )
        failed += report(job, world, outcomes) != 0
    print(f"[sweep] {len(runs) - failed}/{len(runs)} runs succeeded (compare group {spec.name})")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and launch; returns the process exit code (0 ok, 1 job failed, 2 usage)."""
    # Intermixed: overrides may come before or after the flags.
    args = build_parser().parse_intermixed_args(argv)
    runtime.setup()
    try:
        if args.sweep:
            return run_sweep(args, os.environ.get(ENTRY_ENV) or None)
        if args.nproc is not None and not args.local:
            raise UsageError("--nproc applies to --local runs only (on SLURM: slurm.nodes / gpus_per_node)")
        entry = os.environ.get(ENTRY_ENV) or None
        recipe = load(args)
        if args.dry_run:
            return dry_run(recipe, args)
        if args.local:
            return run_local(recipe, args, entry)
        return run_slurm(recipe, args, entry)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
