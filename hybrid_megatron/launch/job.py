"""The callable every rank of a launched job runs, and how a rank's bad input reaches the launcher.

Each task runs `TrainJob`: it derives MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK
(and LOCAL_WORLD_SIZE, NODE_RANK) from ``submitit.JobEnvironment()``, exports them, sets the
process up (``hybrid_megatron.runtime.setup``) and calls the trainer entry
``hybrid_megatron.training.entry:train(recipe)``, which initialises torch.distributed from them
(gloo on CPU, nccl on GPU). A rank that stops on bad input (any ``InputError``: recipe, data,
tokenizer, checkpoint) is reported by its one-line message; other failures by their traceback.
Testing/debugging hook: the environment variable ``HM_TRAIN_ENTRY=module:function``, read when
the launcher starts, replaces the trainer entry (it is called with the Recipe). submitit pickles
the job by reference, so ranks import this module (and the entry's) by name.

Preemption and time limits: sbatch asks SLURM for SIGUSR2 ``slurm.signal_delay_s`` seconds
before the limit (submitit's preemption signal). `PreemptionBridge` hands it to the trainer's
SIGUSR1 handler (save at the step boundary, then return); once the trainer has returned, rank 0
runs submitit's handler, which calls ``TrainJob.checkpoint()`` (a fresh TrainJob with
``checkpoint.resume: auto``) and requeues the job (``scontrol requeue``); the requeued job
resumes from the checkpoint just written. On preemption SLURM sends SIGTERM, which the trainer
handles itself; ``--requeue`` lets SLURM put the job back in the queue.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from hybrid_megatron import runtime
from hybrid_megatron.errors import InputError

ENTRY_ENV = "HM_TRAIN_ENTRY"
DEFAULT_ENTRY = "hybrid_megatron.training.entry:train"

# The last line of a rank's traceback when its entry stopped on bad input, followed by the
# error's class name and message as JSON (one line whatever the message holds).
INPUT_ERROR_MARK = "[input error] "


class RankInputError(Exception):
    """Raised by a rank whose entry raised an InputError, to hand its message to the launcher.

    A rank's outcome reaches the launcher only as traceback text; this exception's message (the
    traceback's last line) carries the original error in a form `input_error_line` reads back.
    """

    def __init__(self, error: InputError) -> None:
        super().__init__(
            INPUT_ERROR_MARK + json.dumps({"error": type(error).__name__, "message": str(error)})
        )


def input_error_line(traceback_text: str) -> str | None:
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


def resolve_entry(spec: str) -> Callable[[Any], Any]:
    """Import the trainer entry named ``module:function`` (a module importable by name).

    Returns the callable; raises ValueError for a malformed spec (a file path included: ranks
    import entries by name, as they unpickle the job), ImportError/AttributeError when it
    cannot be found.
    """
    target, sep, func = spec.rpartition(":")
    if not sep or not target or not func:
        raise ValueError(f"{ENTRY_ENV}: expected module:function, got {spec!r}")
    if target.endswith(".py") or os.sep in target:
        raise ValueError(
            f"{ENTRY_ENV}: expected module:function with a module importable by name, "
            f"not a file path, got {spec!r}"
        )
    return getattr(importlib.import_module(target), func)


def slurm_master_port(job_id: str) -> int:
    """A rendezvous port every task of a SLURM job computes alike from its job id (20000-39999)."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def rendezvous_env(job_env: Any, master_port: int | None = None) -> dict:
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

    def install(self) -> PreemptionBridge:
        """Take over the preemption signal (main thread only; elsewhere a no-op). Returns self."""
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(self.signum, self._on_signal)
            self.installed = True
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        trainer = signal.getsignal(signal.SIGUSR1)
        if callable(trainer) and not self.deferred:
            self.deferred, self.frame = True, frame
            print(
                f"[launch] {signal.Signals(signum).name}: asking the trainer to checkpoint and stop; "
                "the job is requeued after it returns",
                flush=True,
            )
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

    def __init__(
        self,
        recipe: Any,
        entry: str | None = None,
        master_port: int | None = None,
        threads: int | None = None,
    ) -> None:
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
        finished = (
            isinstance(result, dict) and "stopped_by_signal" in result and not result["stopped_by_signal"]
        )
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
