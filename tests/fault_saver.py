"""A minimal process that saves checkpoints with the trainer's own checkpoint code, for the
fault-injection tests (tests/test_faults.py) to kill or starve of disk mid-save.

    python -m tests.fault_saver ROOT SAVES
    python -m tests.fault_saver ROOT --kill-trials N --seed S --max-delay SECONDS

One gloo rank builds the tiny intra hybrid (2 layers) with its optimizer and schedule, resumes
from ``ROOT``'s ``latest`` (checking that every weight holds the value its step was saved with),
then saves ``SAVES`` checkpoints of the following steps (``checkpoint.keep_last`` 2), each with
every weight set to its step number. It prints one line per event, flushed at once:

    resumed STEP ok|WRONG     the checkpoint ``latest`` named loaded, with the right weights
    saving STEP               a save starts
    saved STEP                save_checkpoint returned
    error MESSAGE             a CheckpointError (exit code 2)

``--kill-trials``: see `drive_kills` (``FAULT_SAVER_STDERR=FILE`` keeps the stderr of its
forked processes, which is dropped otherwise).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "intra_tiny.yaml"


def _say(line: str) -> None:
    print(line, flush=True)


def _fill(model_chunks, value: float) -> None:
    import torch

    with torch.no_grad():
        for chunk in model_chunks:
            for param in chunk.parameters():
                param.fill_(value)


def _holds(model_chunks, value: float) -> bool:
    return all(bool((p == value).all()) for chunk in model_chunks for p in chunk.parameters())


def save_steps(root: str, saves: int) -> int:
    """Resume from ``root`` and save ``saves`` more steps (see the module docstring); returns
    the exit code."""
    from hybrid_megatron import runtime

    runtime.setup()
    import torch.distributed as dist

    from hybrid_megatron.checkpoint_layout import CheckpointError, latest_checkpoint
    from hybrid_megatron.config import load_recipe
    from hybrid_megatron.training import checkpoint as ckpt
    from hybrid_megatron.training.distributed import init_distributed_from_env
    from hybrid_megatron.training.model_setup import build_training_model
    from hybrid_megatron.training.parallel_setup import setup_model_parallel
    from hybrid_megatron.training.trainable import Trainable

    init_distributed_from_env()
    recipe = load_recipe(
        str(RECIPE), [f"checkpoint.dir={root}", "model.num_layers=2", "tracking.enabled=false"]
    )
    setup_model_parallel(recipe.parallel, recipe.train.seed)
    chunks = build_training_model(recipe)
    trainable = Trainable.build(chunks, recipe.train, total_steps=10_000)
    ckpt._materialise_optimizer_state(trainable.optimizer)  # Adam states exist before a save
    try:
        latest = latest_checkpoint(root)
        state = ckpt.TrainingState()
        if latest is not None:
            state = ckpt.load_checkpoint(latest, chunks, trainable.optimizer, trainable.scheduler)
            _say(f"resumed {state.step} {'ok' if _holds(chunks, float(state.step)) else 'WRONG'}")
        for _ in range(saves):
            state.step += 1
            _fill(chunks, float(state.step))
            _say(f"saving {state.step}")
            ckpt.save_checkpoint(root, chunks, trainable.optimizer, trainable.scheduler, state, keep_last=2)
            _say(f"saved {state.step}")
    except CheckpointError as err:
        _say(f"error {err}")
        return 2
    finally:
        dist.destroy_process_group()
    return 0


def drive_kills(root: str, trials: int, seed: int, max_delay: float) -> None:
    """``trials`` times: fork a process that resumes from ``root`` and saves without end, kill
    it (and the helper processes it started) with SIGKILL a seeded random delay after its first
    save returned, and print one JSON record of what it said (each line with its arrival time)
    and what ``root`` holds then. A last process only resumes. The modules are imported once,
    here, before the forks. The delay starts after the first save because megatron-core starts
    a helper server in a process's first save, which takes seconds on a busy machine."""
    import json
    import random
    import select
    import time

    from hybrid_megatron import checkpoint_layout as layout
    from hybrid_megatron.training import checkpoint, model_setup, trainable  # noqa: F401
    from tests.distributed import free_port

    rng = random.Random(seed)
    for trial in range(trials + 1):
        last = trial == trials
        delay = 0.0 if last else rng.uniform(0.0, max_delay)
        read_end, write_end = os.pipe()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        pid = os.fork()
        if pid == 0:  # the saving process: its own process group, so one kill ends its helpers too
            os.setsid()
            os.close(read_end)
            os.dup2(write_end, 1)
            devnull = os.open(
                os.environ.get("FAULT_SAVER_STDERR", os.devnull), os.O_WRONLY | os.O_CREAT | os.O_APPEND
            )
            os.dup2(devnull, 2)
            code = 1
            try:
                code = save_steps(root, 0 if last else 1_000_000)
            finally:
                os._exit(code)
        os.close(write_end)
        lines, buffer, killed_at = [], b"", None
        started = None
        begun = time.monotonic()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if started is not None and killed_at is None and time.monotonic() >= started + delay:
                os.killpg(pid, signal.SIGKILL)
                killed_at = time.monotonic()
            ready, _, _ = select.select([read_end], [], [], 0.005)
            if not ready:
                continue
            chunk = os.read(read_end, 65536)
            if not chunk:
                break  # the process (and every holder of the pipe) has ended
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            lines += [f"{line.decode()} @{time.monotonic() - begun:.2f}" for line in complete]
            if started is None and any(line.startswith("saved") for line in lines):
                started = time.monotonic()
        if killed_at is None and not last:  # the deadline passed before the first save returned
            os.killpg(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(read_end)
        record = {
            "trial": trial,
            "delay": delay,
            "lines": lines,
            "killed": killed_at is not None,
            "status": status,
            "latest": layout.read_latest(root),
            "step_dirs": {path.name: layout.is_complete(path) for _, path in layout.step_directories(root)},
        }
        print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("saves", type=int, nargs="?", default=1)
    parser.add_argument("--kill-trials", type=int, default=0, help="drive this many kill trials instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.kill_trials:
        drive_kills(args.root, args.kill_trials, args.seed, args.max_delay)
        return 0
    return save_steps(args.root, args.saves)


if __name__ == "__main__":
    sys.exit(main())
