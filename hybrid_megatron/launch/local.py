"""``--local``: the job through submitit's LocalExecutor, ``--nproc`` processes on this machine.

The default process count is the smallest world size the recipe's tp/pp/ep fit, or one per GPU
of the recipe's ``gpus_per_node`` when CUDA is present. The launcher waits, streams rank 0's
log, and exits 1 with the failing rank's error if any rank fails. Given a deadline (a local
sweep's ``--stop-after``), it stops the job there the way a scheduler would (`DeadlineStop`).
A local sweep follows several jobs at once through `LocalRun` (``--concurrent``): each on its
own rendezvous port, with the same GPUs and its share of the CPUs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Collection, Generator
from typing import Any

import submitit

from hybrid_megatron.launch.follow import following, report, wait_through
from hybrid_megatron.launch.job import TrainJob
from hybrid_megatron.launch.plan import UsageError, describe, local_world, log_folder

STOPPED = 3  # run_local's code for a job stopped at its deadline (its ranks saved, or were ended)
STOP_RESEND_S = 5.0  # between SIGTERMs to a job that has not stopped yet
STOP_GRACE_S = 60.0  # after the first SIGTERM, before the job is cancelled


class DeadlineStop:
    """Stops a local job at a deadline so that it can resume: called at every poll of `follow`.

    At ``deadline`` (``time.monotonic()``) it sends SIGTERM to the job's controller (a local
    job's id is its pid), which passes it to every rank: the trainer finishes the step it is
    in, saves a checkpoint, ends its MLflow run KILLED and returns. The signal is sent again
    every ``STOP_RESEND_S`` (a rank still starting up ignores it until the trainer has set its
    handler), and the job is cancelled ``STOP_GRACE_S`` after the first one (what it did not
    save is lost, as at a hard limit). ``sent`` tells whether the deadline was reached.
    """

    def __init__(self, job: Any, deadline: float) -> None:
        self.job, self.deadline = job, deadline
        self.first: float | None = None
        self.last = -float("inf")
        self.cancelled = False

    @property
    def sent(self) -> bool:
        """Whether the job was asked to stop."""
        return self.first is not None

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self.deadline or self.cancelled:
            return
        if self.first is None:
            self.first = now
            print(
                f"[launch] time budget reached: asking job {self.job.job_id} to checkpoint and stop "
                f"(SIGTERM; cancelled if still running in {STOP_GRACE_S:g} s)",
                flush=True,
            )
        if now - self.first >= STOP_GRACE_S:
            print(f"[launch] job {self.job.job_id} still running: cancelled", file=sys.stderr, flush=True)
            self.job.cancel(check=False)
            self.cancelled = True
        elif now - self.last >= STOP_RESEND_S:
            self.last = now
            try:
                os.kill(int(self.job.job_id), signal.SIGTERM)
            except ProcessLookupError:  # it has just ended
                pass


def free_port(taken: Collection[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that is free right now and not in ``taken`` (the ports of jobs
    started but maybe not yet listening: a released port can be handed out again at once)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port
    raise OSError(f"no free TCP port outside the {len(taken)} taken ones")


def submit_local(
    recipe: Any,
    nproc: int,
    entry: str | None,
    gpus: int = 0,
    master_port: int | None = None,
    sharing: int = 1,
) -> Any:
    """Start the job on this machine through submitit's LocalExecutor; returns the submitit job.

    ``nproc`` processes (one per rank), ``gpus`` of them visible (0 on CPU), rendezvous on
    ``master_port`` (default: a free one), the recipe's ``slurm.env`` exported, ``slurm.time``
    as the time limit (USR2 ``signal_delay_s`` before it, as on SLURM). Each rank gets the
    CPUs over ``nproc`` x ``sharing`` (the jobs running at once) as its torch and OpenMP
    threads. ``slurm.setup`` lines are cluster-specific and not run here.
    """
    executor = submitit.LocalExecutor(
        folder=log_folder(recipe, "local"), max_num_timeout=recipe.slurm.max_timeouts
    )
    executor.update_parameters(
        tasks_per_node=nproc,
        gpus_per_node=gpus,
        timeout_min=recipe.slurm.time,
        signal_delay_s=min(recipe.slurm.signal_delay_s, max(1, recipe.slurm.time * 60 // 2)),
    )
    threads = max(1, (os.cpu_count() or 1) // (nproc * sharing))
    port = free_port() if master_port is None else master_port
    # The controller copies this process's environment into every task.
    saved = dict(os.environ)
    os.environ.update(recipe.slurm.env)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        return executor.submit(TrainJob(recipe, entry, master_port=port, threads=threads))
    finally:
        os.environ.clear()
        os.environ.update(saved)


class LocalRun:
    """A job started on this machine (`start`), followed one poll at a time (`steps`), so that a
    sweep can follow several at once; `run_local` follows one to its end.

    Holds the recipe, the submitit job, its number of ranks, its rendezvous port and ``steps``:
    a generator (see `hybrid_megatron.launch.follow.following`) that yields the seconds to wait
    before its next poll and returns the exit code (see `report`), or ``STOPPED`` when the job
    was stopped at the deadline (see `DeadlineStop`), whether or not it reached its last step
    meanwhile.
    """

    def __init__(self, recipe: Any, job: Any, nproc: int, port: int, deadline: float | None, prefix: str):
        self.recipe, self.job, self.nproc, self.port = recipe, job, nproc, port
        self.steps = self._steps(deadline, prefix)

    @classmethod
    def start(
        cls,
        recipe: Any,
        args: argparse.Namespace,
        entry: str | None,
        deadline: float | None = None,
        taken_ports: Collection[int] = (),
        sharing: int = 1,
        prefix: str = "[rank0] ",
    ) -> LocalRun:
        """Print the plan and submit the job: ``--nproc`` ranks (see `local_world`), on a free
        port outside ``taken_ports``, the CPUs shared by ``sharing`` jobs (see `submit_local`);
        rank 0's lines are printed after ``prefix``; stopped at ``deadline``
        (``time.monotonic()``) if given."""
        nproc, gpus = local_world(recipe, args.nproc)
        print(f"[launch] {recipe.name}: {nproc} local ranks ({f'{gpus} GPUs' if gpus else 'CPU'})")
        print(describe(recipe, nproc), flush=True)
        port = free_port(taken_ports)
        try:
            job = submit_local(recipe, nproc, entry, gpus, master_port=port, sharing=sharing)
        except OSError as err:  # the run's folders (logs next to the checkpoints) cannot be made
            raise UsageError(
                f"cannot create {err.filename}: {err.strerror or err} (the run's folders "
                f"go next to checkpoint.dir {recipe.checkpoint.dir})"
            ) from None
        print(f"[launch] local job {job.job_id}; logs in {job.paths.folder}", flush=True)
        return cls(recipe, job, nproc, port, deadline, prefix)

    def _steps(self, deadline: float | None, prefix: str) -> Generator[float, None, int]:
        job = self.job
        stop = DeadlineStop(job, deadline) if deadline is not None else None
        outcomes = yield from following(
            job,
            self.nproc,
            is_active=lambda: not job.done(),
            cancel=self.cancel,
            failure_grace_s=5.0,
            tick=stop,
            prefix=prefix,
        )
        code = report(job, self.nproc, outcomes)
        if stop is not None and stop.sent:
            print(f"[launch] job {job.job_id}: stopped at the time budget", flush=True)
            return STOPPED
        return code

    def cancel(self) -> None:
        """Cancel the job (its ranks are killed)."""
        self.job.cancel(check=False)

    def interrupted(self) -> int:
        """Cancel the job after Ctrl-C; returns its exit code, 130."""
        self.steps.close()
        self.cancel()
        print(f"[launch] interrupted: job {self.job.job_id} cancelled", file=sys.stderr)
        return 130


def run_local(recipe: Any, args: argparse.Namespace, entry: str | None) -> int:
    """Run the job on this machine and wait; returns the exit code (see `report`)."""
    run = LocalRun.start(recipe, args, entry)
    try:
        return wait_through(run.steps)
    except KeyboardInterrupt:
        return run.interrupted()


def next_steps(recipe: Any) -> str:
    """What to try after a local run, with the run's checkpoint and tracking store filled in:
    evaluate, export to Hugging Face, a compute-matched sweep, ``mlflow ui``."""
    ckpt, run_dir = shlex.quote(recipe.checkpoint.dir), recipe.run_dir
    eval_dir, hf_dir = shlex.quote(run_dir + "/eval"), shlex.quote(run_dir + "/hf")
    lines = [
        "next steps:",
        "  # evaluate: validation loss and perplexity, then text generated from a prompt",
        f"  python -m hybrid_megatron.evaluation nll --checkpoint {ckpt} --out {eval_dir}",
        f"  python -m hybrid_megatron.evaluation generate --checkpoint {ckpt} --out {eval_dir}",
        "  # export to a Hugging Face model directory (extra 'convert')",
        f"  python -m hybrid_megatron.convert to-hf --checkpoint {ckpt} --output {hf_dir}",
        "  # compare the kinds at matched compute: 6 tiny CPU runs, a few minutes (recipes/sweeps/)",
        "  python launch/slurm.py recipes/sweeps/tiny_F.yaml --sweep --local",
    ]
    if recipe.tracking.enabled:
        lines += [
            "  # browse the runs",
            "  " + shlex.join(["mlflow", "ui", "--backend-store-uri", recipe.tracking_uri()]),
        ]
    return "\n".join(lines)
