"""Where checkpoints lie on disk: step directories, ``latest``, pruning, the saved recipe.

Layout under a checkpoint root (the recipe's ``checkpoint.dir``)::

    step_00000020/          one megatron-core distributed checkpoint per save
        metadata.json       written last by megatron-core: the directory is a checkpoint
        recipe.yaml         the resolved recipe of the run that saved it
    step_00000040/
    latest                  text file naming the newest complete checkpoint directory

A from-hf conversion writes one checkpoint directory with ``model.yaml`` (the model section)
instead of ``recipe.yaml``.

A save writes into ``step_N.partial-<id>/``, is renamed to ``step_N/`` once complete, and only
then replaces ``latest`` (write a temp file, ``os.replace``). A crash at any point leaves
``latest`` naming the previous complete checkpoint; leftovers of an interrupted save are removed
by the next save. Re-saving a step that already has a directory (a rerun reaching a step an
earlier run saved) points ``latest`` at the new, complete copy before the old one is deleted, so
``latest`` may name a ``.partial-`` directory. Pruning keeps the newest checkpoints up to the one
``latest`` names and never deletes that one; directories of higher steps (left by another run
in the same root) are not pruned: they are replaced when this run saves that step.

Training, conversion and evaluation all read checkpoints through this module, which imports
neither torch nor megatron-core.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from hybrid_megatron.config.loader import read_yaml
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.recipe import Recipe, validate_recipe
from hybrid_megatron.errors import InputError

LATEST = "latest"
STEP_PREFIX = "step_"
METADATA_FILE = "metadata.json"  # megatron-core's; its presence marks a complete checkpoint
RECIPE_FILE = "recipe.yaml"  # the recipe saved with a training checkpoint
MODEL_FILE = "model.yaml"  # the model section written next to a from-hf checkpoint
_PARTIAL = ".partial-"


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path."""


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"{STEP_PREFIX}{step:08d}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a complete checkpoint directory's name (``step_00000040`` -> 40), else None.

    None for anything else, including an unfinished ``step_N.partial-<id>`` directory.
    """
    name = Path(path).name
    digits = name[len(STEP_PREFIX) :] if name.startswith(STEP_PREFIX) else ""
    return int(digits) if digits.isdigit() else None


def is_complete(step_dir: str | Path) -> bool:
    """Whether ``step_dir`` holds a finished megatron-core checkpoint (its metadata file)."""
    return (Path(step_dir) / METADATA_FILE).exists()


def is_checkpoint_root(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint root, i.e. holds a ``latest`` pointer."""
    return (Path(path) / LATEST).exists()


def read_latest(root: str | Path) -> str | None:
    """The directory name ``root/latest`` holds, or None when there is no ``latest``."""
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.exists() else None


def write_latest(root: str | Path, name: str) -> None:
    """Point ``root/latest`` at checkpoint directory ``name`` (temp file + rename: atomic)."""
    root = Path(root)
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name)
    os.replace(tmp, root / LATEST)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` per its ``latest`` pointer, or None.

    Raises CheckpointError when ``latest`` names a directory that is missing or incomplete.
    """
    name = read_latest(root)
    if name is None:
        return None
    target = Path(root) / name
    if not is_complete(target):
        raise CheckpointError(f"{Path(root) / LATEST} names {target}, which is not a complete checkpoint")
    return target


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint root (holding ``latest``) or one step directory -> the step directory.

    Raises CheckpointError naming the path when neither is found.
    """
    path = Path(path)
    latest = latest_checkpoint(path) if is_checkpoint_root(path) else None
    if latest is not None:
        return latest
    if is_complete(path):
        return path
    raise CheckpointError(f"{path}: neither a checkpoint directory nor a root with '{LATEST}'")


def checkpoint_root(path: str | Path) -> Path:
    """The checkpoint root (the directory holding ``latest``) of a root or a step directory,
    absolute; a ``step_N.partial-<id>`` directory that ``latest`` names counts as a step
    directory."""
    p = Path(path).resolve()
    return p.parent if p.name.startswith(STEP_PREFIX) else p


def step_directories(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every ``step_N`` directory under ``root``, by step.

    A save gets its ``step_N`` name only once it is complete; unfinished ``.partial-``
    directories are not listed.
    """
    return sorted(
        (step, path)
        for path in Path(root).iterdir()
        if path.is_dir() and (step := checkpoint_step(path)) is not None
    )


def start_save(root: str | Path, step: int) -> Path:
    """Create the directory a save of ``step`` writes into (``step_N.partial-<id>``), first
    removing what interrupted saves left (except one that ``latest`` names). Returns it."""
    root = Path(root)
    remove_leftovers(root)
    partial = root / f"{step_dir_name(step)}{_PARTIAL}{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    return partial


def finish_save(partial: Path) -> Path:
    """Give a written save (from `start_save`) its ``step_N`` name and point ``latest`` at it.

    If ``step_N`` exists already (a rerun reaching a step an earlier run saved) and ``latest``
    names it, ``latest`` names the new complete copy first: a crash while the old one is
    deleted must not leave ``latest`` naming a half-deleted one. Returns the final directory.
    """
    root = partial.parent
    final = root / partial.name.split(_PARTIAL)[0]
    if final.exists():
        if read_latest(root) == final.name:
            write_latest(root, partial.name)
        shutil.rmtree(final)
    os.replace(partial, final)
    write_latest(root, final.name)
    return final


def remove_leftovers(root: str | Path) -> None:
    """Delete unfinished saves (``step_N.partial-<id>``) except one that ``latest`` names."""
    root = Path(root)
    current = read_latest(root)
    for leftover in root.glob(f"{STEP_PREFIX}*{_PARTIAL}*"):
        if leftover.name != current:
            shutil.rmtree(leftover, ignore_errors=True)


def prune(root: str | Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest checkpoints up to the one ``latest`` names; delete older ones.

    The checkpoint ``latest`` names is never deleted; nothing is deleted when ``latest`` does
    not name a ``step_N`` directory. Checkpoints of higher steps than ``latest``'s (another
    run's, e.g. after ``resume: none`` in a used root) are kept. Unfinished saves are removed.
    """
    root = Path(root)
    current = read_latest(root)
    current_step = checkpoint_step(current) if current else None
    if current_step is None:
        return
    done = [(step, path) for step, path in step_directories(root) if step <= current_step]
    for _, old in done[:-keep_last]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    remove_leftovers(root)


def read_saved_recipe(step_dir: str | Path) -> Recipe:
    """The validated recipe saved with the checkpoint in ``step_dir`` (its ``recipe.yaml``).

    Relative paths in it resolve against ``step_dir``. Raises CheckpointError when the
    checkpoint has no recipe (it cannot tell which model it holds), RecipeError when the
    recipe does not validate.
    """
    step_dir = Path(step_dir)
    recipe_file = step_dir / RECIPE_FILE
    if not recipe_file.exists():
        raise CheckpointError(f"{step_dir}: has no {RECIPE_FILE}; cannot tell which model it holds")
    return validate_recipe(read_yaml(recipe_file), step_dir, str(recipe_file))


def read_saved_model(step_dir: str | Path) -> ModelConfig | None:
    """The ModelConfig stored with a checkpoint (a from-hf ``model.yaml`` or a training run's
    ``recipe.yaml``), or None when it has neither."""
    step_dir = Path(step_dir)
    for name in (MODEL_FILE, RECIPE_FILE):
        if (step_dir / name).exists():
            return ModelConfig(**read_yaml(step_dir / name)["model"])
    return None
