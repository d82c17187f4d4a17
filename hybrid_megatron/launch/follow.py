"""Following a submitted job: rank 0's log streamed as it grows, each rank's outcome, the report."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from submitit.core.utils import pickle_load

from hybrid_megatron.launch.job import input_error_line

T = TypeVar("T")

SUMMARY_KEYS = ("checkpoint_dir", "last_checkpoint", "final_loss", "mlflow_run_id")


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
                with open(path, errors="replace") as handle:
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


def read_outcome(task: Any) -> tuple | None:
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


def follow(job: Any, nproc: int, *args: Any, **kwargs: Any) -> list:
    """Wait for a job, streaming rank 0's stdout and stderr; returns each rank's outcome: a list
    with one ``read_outcome`` per rank (None for a rank that ended without a result: killed, or
    cancelled after a peer failed). Takes what `following` takes."""
    return wait_through(following(job, nproc, *args, **kwargs))


def wait_through(steps: Generator[float, None, T]) -> T:
    """Drive a stepwise wait (see `following`) to its end, sleeping the seconds each step asks
    for; returns its value."""
    try:
        while True:
            time.sleep(next(steps))
    except StopIteration as end:
        return end.value


def following(
    job: Any,
    nproc: int,
    is_active: Callable[[], bool],
    cancel: Callable[[], object],
    failure_grace_s: float,
    poll_s: float = 0.5,
    settle_s: float = 30.0,
    tick: Callable[[], object] | None = None,
    prefix: str = "[rank0] ",
) -> Generator[float, None, list]:
    """`follow` one poll at a time, so that one process can follow several jobs at once.

    Takes the submitit job, its number of tasks, a liveness probe, a cancel function and how
    long the other ranks may keep running after one failed before the job is cancelled (they
    would otherwise hang in a collective), how long to wait for the job to end once every rank
    has returned, and ``tick``, called at every poll (e.g. to stop the job at a deadline).
    A generator: each step polls once and yields the seconds to wait before the next; it
    returns (``StopIteration.value``) what `follow` returns. Rank 0's lines are printed after
    ``prefix``.
    """
    tasks = [job.task(k) if nproc > 1 else job for k in range(nproc)]
    follower = LogFollower([tasks[0].paths.stdout, tasks[0].paths.stderr], prefix)
    failed_at: float | None = None
    cancelled = False
    outcomes: list = [None] * nproc
    while True:
        follower.poll()
        if tick is not None:
            tick()
        outcomes = [outcomes[k] or read_outcome(tasks[k]) for k in range(nproc)]
        if all(o is not None for o in outcomes):
            # Every rank has returned; let the job itself end too (SLURM marks it COMPLETED
            # once the batch script exits), so callers see a finished job.
            deadline = time.time() + settle_s
            while time.time() < deadline and is_active():
                yield poll_s
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
                yield 0.2
                outcomes = [outcomes[k] or read_outcome(tasks[k]) for k in range(nproc)]
            break
        yield poll_s
    follower.poll(final=True)
    return outcomes


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def report(job: Any, nproc: int, outcomes: list) -> int:
    """Print the end of a followed job: rank 0's summary, or each failed rank's error. Returns the
    exit code."""
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
        print(
            f"[launch] rank {first} failed: {brief}"
            if brief
            else f"[launch] rank {first} failed:\n{outcomes[first][1]}",
            file=sys.stderr,
        )
        print(
            f"[launch] rank {first} logs: {task(first).paths.stdout} {task(first).paths.stderr}",
            file=sys.stderr,
        )
        for k in errors[1:]:
            last = outcomes[k][1].strip().splitlines()[-1] if outcomes[k][1].strip() else "?"
            print(f"[launch] rank {k} failed after rank {first}: {last}", file=sys.stderr)
    for k in failed:
        if outcomes[k] is None:
            print(
                f"[launch] rank {k} ended without a result (killed, crashed or cancelled); last "
                f"lines of {task(k).paths.stderr}:\n{_tail(task(k).paths.stderr)}",
                file=sys.stderr,
            )
    print(f"[launch] job {job.job_id}: FAILED ({len(failed)} of {nproc} ranks)", file=sys.stderr)
    return 1
