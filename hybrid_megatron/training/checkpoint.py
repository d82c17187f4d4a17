"""Atomic, resharding-capable checkpoints through megatron-core's dist_checkpointing.

Where checkpoints lie (step directories, ``latest``, pruning) is
:mod:`hybrid_megatron.checkpoint_layout`'s; this module writes and reads their contents. A save
is written into a ``.partial-`` directory and published only once every rank has finished, so
a crash at any point leaves ``latest`` naming the previous complete checkpoint. Model and
optimizer states are sharded per parameter (not per rank), so a checkpoint written at one
TP/PP/EP layout loads at another.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory
from torch.distributed.checkpoint.api import CheckpointException

from hybrid_megatron import checkpoint_layout as layout
from hybrid_megatron.checkpoint_layout import CheckpointError

# megatron-core raises many types; torch's distributed checkpoint wraps a rank's failure (a
# key missing from the checkpoint, say) in CheckpointException, a BaseException.
LOAD_ERRORS = (Exception, CheckpointException)


def check_writable(root: str) -> None:
    """Create ``root`` if needed and prove it is writable (probe file); raises CheckpointError."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = Path(root) / f".write-probe-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"checkpoint.dir: {root} is not writable ({err.strerror})") from None


@dataclass
class TrainingState:
    """What a checkpoint holds besides weights and optimizer: where training stands."""

    step: int = 0
    consumed_samples: int = 0
    consecutive_nan_skips: int = 0
    skipped_steps: int = 0


def _rng_entry(rank: int, world: int) -> ShardedObject:
    # Per-rank RNG streams (CPU, CUDA when present, megatron's tracker): one object per rank.
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel.random import convert_cuda_rng_state

    # The graph-safe tracker (train.cuda_graphs) holds generators, the plain one state tensors;
    # checkpoints always store tensors, so a run resumes with or without CUDA graphs.
    tracker = {
        name: convert_cuda_rng_state(s, to_graphable=False)
        for name, s in get_cuda_rng_tracker().get_states().items()
    }
    state = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tracker,
    }
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel.random import is_graph_safe_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = get_cuda_rng_tracker()
    graph_safe = torch.cuda.is_available() and is_graph_safe_cuda_rng_tracker(tracker)
    set_tracker_states(tracker, state["tracker"], graph_safe)


def set_tracker_states(tracker, saved: dict, graph_safe: bool) -> None:
    """Load saved RNG tracker streams (name -> state tensor) into megatron's ``tracker``.

    A plain tracker holds state tensors and takes the saved ones as they are. A graph-safe tracker
    (``train.cuda_graphs``) holds generator objects, and those objects must stay: a CUDA graph
    registers the generators it may draw from when it is captured, and TE's tracker lists its
    generators in a registry of its own that the capture reads. A new object would be unregistered,
    and the first captured kernel drawing from it fails ("Attempt to increase offset for a CUDA
    generator not in capture mode"). So each live generator takes its saved state in place;
    streams this run does not have are not used by it and are left out.
    """
    if not graph_safe:
        tracker.set_states(dict(saved))
        return
    live = tracker.get_states()
    for name, saved_state in saved.items():
        if name in live:
            live[name].set_state(saved_state)


def _language_model(model_chunks):
    # Checkpoint keys come from the GPTModel itself, never from its DDP / Float16Module
    # wrappers (which would prefix "module."), so they do not depend on precision or wrapping.
    from hybrid_megatron.training.model_setup import unwrap

    return unwrap(model_chunks[0])


# Optimizer states in per-parameter (canonical) form, so they reload at another TP/PP/DP layout
# like the weights, under one key per parameter whichever optimizer holds it: megatron-core
# chains a separate optimizer for the experts only when EP > 1, and its "chained_<i>." key
# prefixes would tie a checkpoint to its EP size (_fit_optimizer_state handles the rest).
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _sharded_state(model_chunks, optimizer, scheduler, state: TrainingState, loading: bool):
    model_sd = _language_model(model_chunks).sharded_state_dict()
    out = {
        "model": model_sd,
        "training_state": vars(state).copy(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng_state": _rng_entry(dist.get_rank(), dist.get_world_size()),
    }
    if optimizer is not None:
        out["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=loading, metadata=dict(OPTIMIZER_FORMAT)
        )
    return out


def save_checkpoint(
    root: str,
    model_chunks,
    optimizer,
    scheduler,
    state: TrainingState,
    keep_last: int,
    recipe_yaml: str | None = None,
) -> Path:
    """Save a checkpoint of model, optimizer, LR schedule, RNG and TrainingState; all ranks call.

    Takes the checkpoint root, the (DDP-wrapped) model chunks, the megatron optimizer and
    scheduler, the TrainingState, how many checkpoints to keep and the resolved recipe (written
    as ``recipe.yaml`` inside the checkpoint, so the model can be rebuilt from the checkpoint
    alone). Returns the final directory.
    """
    rank = dist.get_rank()
    box: list[Any] = [str(layout.start_save(root, state.step)) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    partial = Path(box[0])

    try:
        with _stop_signals_held():
            dist_checkpointing.save(
                _sharded_state(model_chunks, optimizer, scheduler, state, loading=False), str(partial)
            )
    except (OSError, CheckpointException) as err:  # a write failed (a full disk, a quota);
        raise _save_failure(root, partial, err) from err  # megatron-core gathers it on every rank
    dist.barrier()
    if rank == 0:
        try:
            if recipe_yaml is not None:
                (partial / layout.RECIPE_FILE).write_text(recipe_yaml)
            layout.finish_save(partial)
        except OSError as err:
            raise _save_failure(root, partial, err) from err
        layout.prune(root, keep_last)
    dist.barrier()
    return Path(root) / layout.step_dir_name(state.step)


def _save_failure(root: str, partial: Path, err: BaseException) -> CheckpointError:
    """The one-line error for a save that could not be written: the checkpoint directory, the
    cause (megatron-core's writer processes lose the errno, so the free space is given too)
    and the checkpoint ``latest`` still names. Rank 0 removes the unfinished directory unless
    ``latest`` names it (a re-save of the latest step that failed while deleting the old copy)."""
    if dist.get_rank() == 0 and layout.read_latest(root) != partial.name:
        shutil.rmtree(partial, ignore_errors=True)
    if isinstance(err, OSError) and err.strerror:
        cause = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = lines[-1] if lines else type(err).__name__
    try:
        free = f"{shutil.disk_usage(root).free / 2**30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    latest = layout.read_latest(root)
    kept = f"latest still names {latest}" if latest else "there is no earlier checkpoint"
    return CheckpointError(
        f"cannot save checkpoint {partial.name.split('.partial-')[0]} in checkpoint.dir {root}: "
        f"a write failed ({cause}; {free}: is the disk full or over quota?); {kept}"
    )


# The signals SLURM sends before a time limit or on preemption (SIGUSR2 is submitit's).
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}


@contextmanager
def _stop_signals_held():
    """Block the stop signals in this thread while megatron-core writes a checkpoint.

    megatron-core's writer starts helper processes from this thread: a results-queue server
    (a fresh interpreter, started by the first save and kept) and writer processes per save.
    SLURM signals every process of a job step; a fresh interpreter dies of SIGUSR2/SIGUSR1
    (their default action), and the save that the signal asked for then fails on a broken
    pipe. Children inherit the blocked mask, so they ignore them; this process still gets the
    signal (another thread takes it, or this one once the mask is restored).
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def load_checkpoint(path: Path, model_chunks, optimizer, scheduler) -> TrainingState:
    """Load a checkpoint into model, optimizer and scheduler (any parallel layout); all ranks.

    Returns the TrainingState stored with it. Raises CheckpointError naming the path when it
    is not a readable checkpoint. RNG streams are restored only when the world size matches.
    """
    if not layout.is_complete(path):
        raise CheckpointError(f"checkpoint.resume: {path} is not a megatron-core checkpoint")
    check_checkpoint_files(path)
    if optimizer is not None:
        _materialise_optimizer_state(optimizer)
    saved = _saved_metadata(path)
    if any(key.startswith("chained_") for key in saved):
        # Optimizer keys per EP size ("chained_<i>."): a retired layout that OPTIMIZER_FORMAT
        # does not read; refused with the two ways out.
        raise CheckpointError(
            f"cannot load checkpoint {path}: its optimizer state uses the "
            f"retired per-EP 'chained_' keys; resume it with the version that "
            f"wrote it, or start from its weights with checkpoint.init_from"
        )
    template = _sharded_state(model_chunks, optimizer, scheduler, TrainingState(), loading=True)
    if "rng_state" not in saved or saved["rng_state"].global_shape[0] != dist.get_world_size():
        # The RNG ShardedObject's global shape is the world size it was saved with.
        template.pop("rng_state")
    fresh = unsaved_extra_state(template["model"], saved)
    for key in fresh:
        template["model"].pop(key)
    _check_same_model(path, template["model"], saved)
    try:
        loaded = dist_checkpointing.load(template, str(path))
    except LOAD_ERRORS as err:  # the user needs the path and the cause
        raise CheckpointError(f"cannot load checkpoint {path}: {describe_load_failure(path, err)}") from err
    model = _language_model(model_chunks)
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    # Extra state keeps its fresh value when the checkpoint has none for it (``fresh``) or the
    # sharded state dict never carries it (GPTModel leaves out the output layer's).
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if unexpected or missing:
        raise CheckpointError(
            f"cannot load checkpoint {path}: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    if optimizer is not None:
        optimizer.load_state_dict(_fit_optimizer_state(loaded["optimizer"], optimizer, path))
    if scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.num_steps = 0  # megatron-core's load_state_dict adds the saved count to it
        scheduler.load_state_dict(loaded["scheduler"])
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    return TrainingState(**loaded["training_state"])


# Files of a megatron-core (torch_dist) checkpoint besides its shards: megatron-core's common
# state and its metadata, and torch's index of every shard's records.
_COMMON_FILE, _SHARD_INDEX = "common.pt", ".metadata"


def _shard_extents(path: Path) -> dict[str, list[tuple[int, int]]]:
    """Shard file name -> (offset, length) of each record that torch's ``.metadata`` places in
    it. Raises CheckpointError naming ``.metadata`` when it cannot be read."""
    from torch.distributed.checkpoint import FileSystemReader

    index = path / _SHARD_INDEX
    if not index.is_file():
        raise CheckpointError(f"checkpoint {path}: {index} is missing (the index of its shards)")
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
        extents: dict[str, list[tuple[int, int]]] = {}
        for info in storage.values():
            extents.setdefault(info.relative_path, []).append((info.offset, info.length))
    except Exception as err:  # a truncated or foreign pickle raises anything
        raise CheckpointError(f"checkpoint {path}: unreadable {index}: {err or type(err).__name__}") from None
    return extents


def check_checkpoint_files(path: Path) -> None:
    """Raise CheckpointError naming the file when a checkpoint directory lacks one of its files
    or holds a shard shorter than its records: ``common.pt`` and torch's ``.metadata`` present
    and readable, every ``.distcp`` shard present and long enough. Cheap (reads the index and
    stats the shards), so a resume finds a truncated copy before it builds anything from it;
    bytes changed in place are found by `describe_load_failure` when the load fails.
    """
    common = path / _COMMON_FILE
    if not common.is_file():
        raise CheckpointError(f"checkpoint {path}: {common} is missing (megatron-core's common state)")
    for name, records in sorted(_shard_extents(path).items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"checkpoint {path}: shard {shard} is missing")
        end, size = max(offset + length for offset, length in records), shard.stat().st_size
        if size < end:
            raise CheckpointError(
                f"checkpoint {path}: shard {shard} is truncated ({size} bytes; its records end at byte {end})"
            )


def describe_load_failure(path: Path, err: BaseException) -> str:
    """What went wrong in a failed load of the checkpoint at ``path``, in one line: the shard
    whose record does not read back (each record is a zip archive whose CRCs are checked, so
    only a failed load pays for reading the shards again), else the error's last line."""
    import zipfile

    try:
        extents = _shard_extents(path)
    except CheckpointError as bad_index:
        return str(bad_index)
    for name, records in sorted(extents.items()):
        with open(path / name, "rb") as shard:
            for offset, length in sorted(records):
                shard.seek(offset)
                record = io.BytesIO(shard.read(length))
                try:
                    with zipfile.ZipFile(record) as archive:
                        broken = archive.testzip()
                except (zipfile.BadZipFile, OSError, EOFError) as bad:
                    broken = str(bad)
                if broken is not None:
                    return f"shard {path / name} is corrupt (its record at byte {offset}: {broken})"
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def _materialise_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its (dummy) Adam states so that they can be loaded in place.

    Without TE/apex, megatron-core's DistributedOptimizer reads the Adam ``step`` from the
    inner torch optimizer's state, which is empty until the first step; megatron-core's own
    dummy-state initialisation (zero gradients, one optimizer step) is run first, as its
    loading path expects, with lr and weight decay at 0 for that step so that it cannot move a
    weight (AdamW's decoupled decay would, at a nonzero lr). The dummy values are overwritten
    by the load.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            groups = opt.optimizer.param_groups
            saved = [(g["lr"], g["weight_decay"]) for g in groups]
            for g in groups:
                g["lr"], g["weight_decay"] = 0.0, 0.0
            try:
                opt._init_optimizer_states_with_dummy_values()
            finally:
                for g, (lr, wd) in zip(groups, saved):
                    g["lr"], g["weight_decay"] = lr, wd


def unsaved_extra_state(model_template: dict, saved: dict) -> list[str]:
    """Keys of Transformer Engine extra state (FP8 scaling history) that the model has and the
    checkpoint lacks, e.g. ``model.fp8_output_layer`` switched on at a resume, which turns the
    LM head into a TE layer. Takes the model's sharded state dict and the saved metadata
    (``_saved_metadata``). Those entries keep their fresh values: TE's delayed scaling rebuilds
    them from the next steps' amax values. Returns the state-dict keys to leave out of the load."""
    return [
        name
        for name, entry in model_template.items()
        if name.endswith("._extra_state") and isinstance(entry, ShardedObject) and entry.key not in saved
    ]


# Sharded entries of a checkpoint that are not model weights.
_NON_MODEL_PREFIXES = ("optimizer.", "rng_state")


def _check_same_model(path: Path, model_template: dict, saved: dict) -> None:
    """Refuse a resume into a model other than the one saved; all ranks call it together.

    Takes the checkpoint path, this rank's model sharded state dict (entries it will load) and
    the saved metadata (``_saved_metadata``). megatron-core loads only the entries a model asks
    for, so a model with fewer layers (or an attention layer where a Mamba layer was) would
    silently drop the rest, and a model with entries the checkpoint lacks fails with a list of
    every key. The model's keys are gathered from every rank, since a pipeline stage or an
    expert-parallel rank asks for its own part only. Raises CheckpointError naming the path and
    a few of the differing weights. Returns nothing.
    """
    wanted = {key for entry in model_template.values() for key in _stored_keys(entry)}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(wanted))
    wanted = set().union(*everyone)
    # Saved extra state of modules the model builds without one (a TE layer's FP8 history where
    # the model now has another implementation of the same weights) is not a weight: it is left.
    saved_weights = {
        key for key in saved if not key.startswith(_NON_MODEL_PREFIXES) and not key.endswith("._extra_state")
    }
    problems = []
    for what, keys in (
        ("weights the recipe's model lacks", saved_weights - wanted),
        ("weights the checkpoint lacks", wanted - set(saved)),
    ):
        if keys:
            names = sorted(keys)
            problems.append(
                f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            )
    if problems:
        raise CheckpointError(
            f"cannot load checkpoint {path}: it holds another model than the recipe's: "
            f"{'; '.join(problems)}. A resume needs the model the checkpoint was saved with"
        )


def _stored_keys(entry) -> list[str]:
    """The keys under which a sharded state-dict entry is stored. A ShardedTensorFactory (a
    fused weight saved as several tensors) is stored under the keys of what it builds; building
    it only takes views of its tensor."""
    if isinstance(entry, ShardedTensorFactory):
        return [part.key for part in nested_values(entry.build())]
    return [entry.key]


def _saved_metadata(path: Path) -> dict:
    """Sharded key -> metadata (a ShardedTensor or ShardedObject without data) of everything in
    the checkpoint at ``path``. megatron-core lists each object once per shard
    (``rng_state/shard_0_2``); here each object appears once under its own key, with its global
    shape. Raises CheckpointError naming the path when the metadata cannot be read (never
    swallowed: without it a resume would silently restart the RNG streams from the seed)."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    try:
        listed = load_sharded_metadata(str(path))
    except LOAD_ERRORS as err:  # the user needs the path and the cause
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    return {entry.key: entry for entry in listed.values()}


def _fit_optimizer_state(loaded, optimizer, path: Path):
    """The loaded optimizer state in the structure that ``optimizer.load_state_dict`` expects.

    Takes the loaded ``optimizer`` entry, the megatron optimizer and the checkpoint path (for
    errors). megatron-core chains a second optimizer for the experts when EP > 1, so an EP > 1
    checkpoint holds ``{0: dense, 1: experts}`` and an EP = 1 one a single state. The
    per-parameter tensors were loaded where this optimizer's template put them; the param
    groups (with Adam's step) come back as they were saved. When the two structures differ,
    each part of this optimizer gets its own param groups (lr and weight decay follow from the
    recipe and the LR scheduler) with the saved step. Returns the state to load.
    """
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    saved_parts = [loaded[k] for k in sorted(k for k in loaded if isinstance(k, int))]
    saved_chained = bool(saved_parts) and "optimizer" in saved_parts[0]
    if saved_chained == (len(parts) > 1):
        return loaded
    saved_groups = [
        g for part in (saved_parts if saved_chained else [loaded]) for g in part["optimizer"]["param_groups"]
    ]
    steps = [g["step"] for g in saved_groups if "step" in g]
    distinct = sorted({float(s) for s in steps})
    if len(distinct) > 1:
        raise CheckpointError(
            f"cannot load checkpoint {path}: its param groups are at different optimizer steps {distinct}"
        )
    fitted = []
    for i, part in enumerate(parts):
        state = part.state_dict()
        if steps:
            for group in state["optimizer"]["param_groups"]:
                group["step"] = steps[0]
        state["param_state"] = loaded[i]["param_state"] if len(parts) > 1 else loaded["param_state"]
        state["param_state_sharding_type"] = OPTIMIZER_FORMAT["distrib_optim_sharding_type"]
        fitted.append(state)
    return dict(enumerate(fitted)) if len(parts) > 1 else fitted[0]
