"""Run real training jobs as OS processes (so they can be killed) and read their loss logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def start_job(recipe: str, overrides: list[str], world: int, log_dir: Path) -> list[subprocess.Popen]:
    """Start ``world`` ranks of ``python -m hybrid_megatron.training`` (gloo, 127.0.0.1).

    Each rank leads its own process group (``kill_rank`` ends it with the helper processes it
    started, such as megatron-core's checkpoint-writer server, as SLURM ends a job step).
    """
    port = free_port()
    procs = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
        )
        out = open(log_dir / f"rank{rank}.log", "ab")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "hybrid_megatron.training", recipe, *overrides],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return procs


def kill_rank(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to a rank started by `start_job` and every process it started."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_job(procs, timeout: float = 600) -> list[int]:
    """Wait for every rank; returns the exit codes (kills all on timeout)."""
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                kill_rank(q)
            raise
    return codes


def read_losses(run_dir: Path) -> dict[int, str]:
    """Step -> loss (float hex, exact) from a run's train_log.jsonl; a re-run step keeps its
    last record (the resumed run's)."""
    losses = {}
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return losses
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            losses[rec["step"]] = rec["loss"]
    return losses
