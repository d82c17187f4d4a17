"""Needle in a haystack: pass-key retrieval from filler text over context lengths x depths.

The haystack is held-out corpus text (the recipe's validation documents). A needle sentence
"The pass key is NNNNN. Remember it. NNNNN is the pass key." is inserted at a fraction
``depth`` of the haystack; the prompt ends with "What is the pass key? The pass key is" and
the model greedily generates a few tokens. A trial is correct when the first number in the
completion equals the key. Accuracy is averaged over ``trials`` random keys per cell.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hybrid_megatron.evaluation.common import model_device, save_figure
from hybrid_megatron.evaluation.generation import generate

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"


def build_prompt(tokenizer, filler: list[int], context: int, depth: float, key: str) -> list[int]:
    """Token ids of a ``context``-token prompt: filler with the needle at ``depth``, then the question.

    ``filler`` must hold at least ``context`` tokens. Raises ValueError when the needle and
    question alone do not fit.
    """
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question = tokenizer.encode(QUESTION)
    room = context - len(needle) - len(question)
    if room < 0:
        raise ValueError(
            f"context {context} is shorter than needle + question ({len(needle) + len(question)} tokens)"
        )
    hay = filler[:room]
    at = int(round(depth * room))
    return hay[:at] + needle + hay[at:] + question


def first_number(text: str) -> str | None:
    """The first run of digits in ``text``, or None."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def niah_grid(
    model,
    tokenizer,
    filler: Sequence[int],
    contexts: Sequence[int],
    depths: Sequence[float],
    trials: int = 2,
    digits: int = 5,
    seed: int = 0,
    use_cache: bool = True,
) -> dict:
    """Accuracy per (context, depth) cell; returns a JSON-able dict.

    ``{"contexts", "depths", "accuracy": [[acc per depth] per context], "trials", "samples"}``
    (``samples``: a few prompts' keys and completions, for inspection). ``use_cache`` False
    runs uncached generation (for stub models that do not implement an inference context).
    """
    rng = random.Random(seed)
    device = model_device(model)
    filler = list(filler)
    acc: list[list[float]] = []
    samples: list[dict] = []
    for ctx in contexts:
        row = []
        for depth in depths:
            hits = 0
            for t in range(trials):
                key = str(rng.randrange(10 ** (digits - 1), 10**digits))
                offset = rng.randrange(0, max(1, len(filler) - ctx))  # a different haystack per trial
                ids = build_prompt(tokenizer, filler[offset : offset + ctx], ctx, depth, key)
                prompt = torch.tensor([ids], dtype=torch.long, device=device)
                out = generate(model, prompt, max_new_tokens=digits + 2, use_cache=use_cache)
                completion = tokenizer.decode(out.tokens[0, len(ids) :].tolist())
                ok = first_number(completion) == key
                hits += ok
                if t == 0 and len(samples) < 8:
                    samples.append(
                        {"context": ctx, "depth": depth, "key": key, "completion": completion, "correct": ok}
                    )
            row.append(hits / trials)
        acc.append(row)
    return {
        "contexts": list(contexts),
        "depths": list(depths),
        "accuracy": acc,
        "trials": trials,
        "samples": samples,
    }


def plot_heatmap(result: dict, path: str | Path, title: str = "Needle in a haystack") -> Path:
    """Accuracy heatmap PNG (depth x context length) of a ``niah_grid`` result; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array(result["accuracy"], dtype=float).T  # rows: depths, columns: contexts
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * grid.shape[1], 1.2 + 0.6 * grid.shape[0]))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["contexts"])), [str(c) for c in result["contexts"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def filler_tokens(recipe, tokenizer, min_tokens: int) -> list[int]:
    """Held-out corpus tokens (EOD ids removed) to build haystacks from."""
    from hybrid_megatron.evaluation.common import token_stream

    stream = token_stream(recipe, min_tokens * 2)
    eod = tokenizer.eod
    return [int(t) for t in stream if t != eod]
