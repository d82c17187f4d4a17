"""Shared pieces of the evaluation tasks: loading, plain forward passes, held-out token streams."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hybrid_megatron.checkpoint_layout import checkpoint_root


def load_for_eval(checkpoint: str | Path, tp: int = 1, pp: int = 1):
    """Load a training checkpoint for evaluation at TP=``tp``, PP=``pp``.

    Returns ``(recipe, model)`` (model in eval mode), as
    :func:`hybrid_megatron.training.restore.load_trained_model`.
    """
    from hybrid_megatron.config.parallel import ParallelConfig
    from hybrid_megatron.training.restore import load_trained_model

    parallel = ParallelConfig(tp=tp, pp=pp) if (tp, pp) != (1, 1) else None
    return load_trained_model(checkpoint, parallel)


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for parameter-free stubs)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def positions(batch: int, start: int, length: int, device) -> torch.Tensor:
    """Position ids [batch, length] counting from ``start``."""
    return torch.arange(start, start + length, device=device).unsqueeze(0).expand(batch, -1)


@torch.no_grad()
def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence forward (no cache): tokens [b, s] -> float logits [b, s, vocab].

    The logits are gathered over tensor-parallel ranks (the full vocabulary on every rank; the
    model's own output is vocab-sharded at TP > 1).
    """
    out = model(
        tokens,
        positions(tokens.shape[0], 0, tokens.shape[1], tokens.device),
        None,
        runtime_gather_output=True,
    )
    return out.float()


@torch.no_grad()
def per_token_nll(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [b, s] of ``labels`` given ``tokens`` (the model's own fused loss)."""
    pos = positions(tokens.shape[0], 0, tokens.shape[1], tokens.device)
    return model(tokens, pos, None, labels=labels).float()


def held_out_documents(recipe, split: str = "valid", prefix: str | None = None) -> list[np.ndarray]:
    """Token arrays of the held-out documents, in corpus order.

    Takes a recipe, the split (``valid`` or ``test``) and optionally an indexed-dataset prefix
    replacing the recipe's first blend entry. Uses the same document split as training
    (megatron-core's GPTDataset split of ``data.split``), so nothing here was trained on.
    Returns one int64 array per document (EOD included, as stored).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = recipe.data
    path = prefix or data.blend[0].prefix
    ds = IndexedDataset(path)
    n = len(ds)
    if prefix is not None:  # an explicit held-out dataset: all of it
        lo, hi = 0, n
    else:
        # megatron-core's split of documents: cumulative rounded fractions (utils.get_split_indices)
        weights = [float(w) for w in str(data.split or "98,1,1").split(",")]
        weights += [0.0] * (3 - len(weights))
        total = sum(weights)
        bounds = [0]
        for w in weights:
            bounds.append(bounds[-1] + int(round(w / total * float(n))))
        diff = bounds[-1] - n
        for i in range(1, len(bounds)):
            bounds[i] -= diff
        which = {"valid": 1, "test": 2}[split]
        lo, hi = bounds[which], bounds[which + 1]
    return [np.asarray(ds[i], dtype=np.int64) for i in range(lo, hi)]


def token_stream(recipe, min_tokens: int, split: str = "valid", prefix: str | None = None) -> np.ndarray:
    """At least ``min_tokens`` held-out tokens (documents concatenated, repeated if short)."""
    docs = held_out_documents(recipe, split, prefix)
    if not docs:
        raise ValueError(f"split {split!r} of {prefix or recipe.data.blend[0].prefix} has no documents")
    stream = np.concatenate(docs)
    if len(stream) < min_tokens:
        stream = np.tile(stream, min_tokens // len(stream) + 1)
    return stream


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def checkpoint_label(checkpoint: str | Path, recipe=None) -> str:
    """A short label for plots: the run name (parent of the checkpoints dir) or the dir name."""
    p = checkpoint_root(checkpoint)
    if p.name == "checkpoints":
        p = p.parent
    return p.name


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as PNG (creating the folder) and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
