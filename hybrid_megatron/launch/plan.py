"""What the launcher works out before anything runs: the recipe, the world size, the derived
numbers, where the logs go.

Every problem found here is a `UsageError`: one line, exit code 2, nothing submitted.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from hybrid_megatron.errors import InputError


class UsageError(InputError):
    """A problem with the command line or the recipe: printed as one line, exit code 2."""


def load(args: argparse.Namespace) -> Any:
    """Load and validate the recipe named on the command line; UsageError with its message."""
    from hybrid_megatron.config import load_recipe

    try:
        return load_recipe(args.recipe, args.overrides)
    except InputError as err:
        raise UsageError(str(err)) from None


def check_tracking(recipes: Any) -> None:
    """UsageError naming the URI when a recipe's tracking server does not answer (a few seconds
    each, every server once); SQLite and file stores are not checked."""
    from hybrid_megatron.tracking.store import check_reachable

    for uri in dict.fromkeys(r.tracking_uri() for r in recipes if r.tracking.enabled):
        try:
            check_reachable(uri)
        except InputError as err:
            raise UsageError(str(err)) from None


def check_inputs(recipe: Any) -> None:
    """Raise UsageError naming the first input of the recipe that a run would fail on, before
    anything is queued: a data prefix whose .bin/.idx are missing or disagree, a missing
    tokenizer, a ``checkpoint.resume`` or ``checkpoint.init_from`` that holds no checkpoint, a
    ``latest`` in ``checkpoint.dir`` naming no complete one. Reads the indexes and stats
    files only (no tokenizer load, no model)."""
    from hybrid_megatron import checkpoint_layout as layout
    from hybrid_megatron.data.indexed_io import check_indexed_prefix

    data, ckpt = recipe.data, recipe.checkpoint
    try:
        if not Path(data.tokenizer).exists():
            raise UsageError(f"data.tokenizer: {data.tokenizer} does not exist")
        for prefix in data.prefixes():
            check_indexed_prefix(prefix)
        if ckpt.resume == "auto" and layout.is_checkpoint_root(ckpt.dir):
            layout.latest_checkpoint(ckpt.dir)
        elif ckpt.resume not in ("auto", "none"):
            _existing_checkpoint("checkpoint.resume", ckpt.resume)
        if ckpt.init_from is not None:
            _existing_checkpoint("checkpoint.init_from", ckpt.init_from)
    except InputError as err:
        raise UsageError(str(err)) from None


def _existing_checkpoint(field: str, path: str) -> None:
    from hybrid_megatron.checkpoint_layout import resolve_checkpoint

    if not Path(path).exists():
        raise UsageError(f"{field}: {path} does not exist")
    try:
        resolve_checkpoint(path)
    except InputError as err:
        raise UsageError(f"{field}: {err}") from None


def describe(recipe: Any, world_size: int) -> str:
    """The derived-quantities block for ``world_size`` ranks; UsageError if they do not divide."""
    from hybrid_megatron.accounting import count_parameters
    from hybrid_megatron.config import derived, format_derived

    try:
        return format_derived(derived(recipe, world_size, count_parameters))
    except InputError as err:
        raise UsageError(str(err)) from None


def log_folder(recipe: Any, kind: str) -> Path:
    """``<run dir>/<kind>/%j``: submitit's folder for this recipe's jobs (kind: slurm or local)."""
    return Path(recipe.run_dir) / kind / "%j"


def min_world_size(recipe: Any) -> int:
    """The smallest world size the recipe's layout fits: tp*cp*pp*k with (k*tp*cp) % (ep * expert
    tp) == 0."""
    par = recipe.parallel
    k = par.expert_group_size // math.gcd(par.expert_group_size, par.tp * par.cp)
    return par.tp * par.cp * par.pp * k


def local_world(recipe: Any, nproc: int | None) -> tuple[int, int]:
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
            f"(parallel.tp={recipe.parallel.tp} x cp={recipe.parallel.cp} x pp={recipe.parallel.pp}, "
            f"ep={recipe.parallel.ep}"
            f" x expert tp={recipe.parallel.expert_tensor_parallel})"
        )
    if gpus and nproc > gpus:
        raise UsageError(f"--nproc {nproc}: only {gpus} GPUs on this machine")
    return nproc, (nproc if gpus else 0)
