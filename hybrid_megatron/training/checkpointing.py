"""Checkpointing of a run: what to resume, saves every ``checkpoint.interval`` steps and on exit.

The recipe's ``checkpoint:`` section is the policy; :mod:`hybrid_megatron.checkpoint_layout`
owns where checkpoints lie (and keeps the last ``keep_last``), :mod:`.checkpoint` what they
hold.
"""

from __future__ import annotations

from pathlib import Path

from hybrid_megatron.checkpoint_layout import checkpoint_step, is_checkpoint_root, latest_checkpoint
from hybrid_megatron.config.checkpoint import CheckpointConfig
from hybrid_megatron.logs import get_logger, log_rank0
from hybrid_megatron.training.checkpoint import (
    TrainingState,
    check_writable,
    load_checkpoint,
    save_checkpoint,
)

log = get_logger(__name__)


class Checkpointing:
    """Resumes, saves on the step cadence and on exit, for one run.

    Takes the CheckpointConfig and the resolved recipe's YAML (saved with each checkpoint, so
    its model can be rebuilt from the checkpoint alone). ``last_saved`` is the newest checkpoint
    of the run: the one it resumed from, then each save. Every rank calls every method.
    """

    def __init__(self, cfg: CheckpointConfig, recipe_yaml: str):
        self.cfg = cfg
        self.recipe_yaml = recipe_yaml
        self.last_saved: Path | None = None

    def check_writable(self) -> None:
        """Create ``checkpoint.dir`` and prove it writable; raises CheckpointError (before any
        model is built, so a bad path costs seconds)."""
        check_writable(self.cfg.dir)

    def resume_path(self) -> Path | None:
        """The checkpoint ``checkpoint.resume`` asks for: None (``none``, or ``auto`` with
        nothing saved yet), the latest under ``checkpoint.dir`` or under a given root, or a
        given step directory. Raises CheckpointError when ``latest`` names no complete one."""
        choice = self.cfg.resume
        if choice == "none":
            return None
        if choice == "auto":
            return latest_checkpoint(self.cfg.dir)
        path = Path(choice)
        if path.name != "" and is_checkpoint_root(path):
            return latest_checkpoint(path)
        return path

    def resume(self, path: Path | None, trainable) -> TrainingState:
        """Load checkpoint ``path`` into the Trainable and return where training stands; a
        fresh TrainingState when ``path`` is None."""
        self.last_saved = path
        if path is None:
            return TrainingState()
        state = load_checkpoint(path, trainable.model_chunks, trainable.optimizer, trainable.scheduler)
        log_rank0(log, f"resumed from {path} at step {state.step}")
        return state

    def after_step(self, trainable, state: TrainingState) -> None:
        """Save when ``state.step`` is a multiple of ``checkpoint.interval``."""
        if state.step % self.cfg.interval == 0:
            self.save(trainable, state)

    def at_exit(self, trainable, state: TrainingState) -> None:
        """Save the final state (``checkpoint.save_on_exit``: the end of training or a stop
        signal) unless this step is saved already."""
        saved_now = self.last_saved is not None and checkpoint_step(self.last_saved) == state.step
        if self.cfg.save_on_exit and not saved_now:
            self.save(trainable, state)

    def save(self, trainable, state: TrainingState) -> Path:
        """Save a checkpoint of step ``state.step``, keeping the last ``checkpoint.keep_last``;
        returns its directory."""
        self.last_saved = save_checkpoint(
            self.cfg.dir,
            trainable.model_chunks,
            trainable.optimizer,
            trainable.scheduler,
            state,
            self.cfg.keep_last,
            self.recipe_yaml,
        )
        log_rank0(log, f"saved checkpoint {self.last_saved}")
        return self.last_saved
