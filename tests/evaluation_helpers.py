"""Helpers of tests/test_evaluation.py: a tiny trained checkpoint and a copying stub model."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.training_helpers import REPO


def train_tiny(kind: str, run_dir: Path, steps: int = 4, *extra: str) -> dict:
    """Train recipes/<kind>_tiny.yaml in-process for ``steps`` steps (validation at the end).

    Needs the ``single_rank`` fixture. Returns the trainer's summary (``final_val_loss``,
    ``last_checkpoint``, ...).
    """
    from hybrid_megatron.config import load_recipe
    from hybrid_megatron.training.entry import train

    overrides = [
        f"checkpoint.dir={run_dir}/checkpoints",
        f"train.steps={steps}",
        "train.warmup_steps=1",
        f"checkpoint.interval={steps}",
        f"train.eval_interval={steps}",
        "train.eval_iters=2",
        "tracking.enabled=false",
        *extra,
    ]
    return train(load_recipe(str(REPO / "recipes" / f"{kind}_tiny.yaml"), overrides))


class InductionCopyModel(torch.nn.Module):
    """A harness-sanity "model" that copies: it predicts the token that followed the longest
    earlier match of the current suffix (an ideal induction head).

    Implements the evaluation model interface ``model(input_ids [b, s], position_ids,
    attention_mask) -> logits [b, s, vocab]`` (no cache). Asked "... The pass key is" after a
    needle "The pass key is 12345", it continues with the key, so NIAH must score 100%.
    """

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, position_ids=None, attention_mask=None, **unused):
        """One-hot logits [b, s, vocab] of each position's copied continuation."""
        b, s = input_ids.shape
        out = torch.zeros(b, s, self.vocab)
        for i in range(b):
            ids = input_ids[i].tolist()
            # Only the last position matters for generation; earlier ones get a uniform 0 row.
            t = s - 1
            best, best_len = None, 0
            for j in range(t - 1, -1, -1):
                k = 0
                while k <= j and ids[j - k] == ids[t - k]:
                    k += 1
                if k > best_len:
                    best, best_len = j, k
            if best is not None:
                out[i, t, ids[best + 1]] = 1.0
        return out
