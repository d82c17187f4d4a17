"""Length extrapolation: loss by position bucket at contexts 1x..8x the training length.

For each multiple m, ``num_sequences`` held-out windows of ``m * seq_length + 1`` tokens are
scored in one forward pass each; per-token NLL is averaged within buckets of
``bucket`` positions. A model that extrapolates keeps (or lowers) its loss past the training
length; one that does not shows a jump at ``seq_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hybrid_megatron.evaluation.common import model_device, per_token_nll, save_figure


@torch.no_grad()
def loss_by_position(model, stream: np.ndarray, context: int, num_sequences: int) -> np.ndarray:
    """Mean per-position NLL [context] over ``num_sequences`` consecutive windows of ``stream``."""
    device = model_device(model)
    total = np.zeros(context, dtype=np.float64)
    for i in range(num_sequences):
        chunk = torch.from_numpy(stream[i * context : i * context + context + 1]).long().to(device)
        nll = per_token_nll(model, chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0))
        total += nll[0].double().cpu().numpy()
    return total / num_sequences


def bucketize(values: np.ndarray, bucket: int) -> list[dict]:
    """Mean of ``values`` per bucket of ``bucket`` positions: [{"start", "end", "loss"}]."""
    return [
        {"start": s, "end": min(s + bucket, len(values)), "loss": float(values[s : s + bucket].mean())}
        for s in range(0, len(values), bucket)
    ]


def extrapolation_curves(
    model,
    recipe,
    multiples: Sequence[int] = (1, 2, 4, 8),
    num_sequences: int = 2,
    buckets_per_train_len: int = 4,
) -> dict:
    """Loss-by-position buckets for each context multiple; returns a JSON-able dict.

    ``{"train_seq_length", "bucket", "contexts": {str(L): {"mean_loss", "buckets": [...]}}}``;
    buckets are ``seq_length / buckets_per_train_len`` positions wide, so every context shares
    bucket boundaries and the training length is a bucket edge.
    """
    seq = recipe.data.seq_length
    bucket = max(1, seq // buckets_per_train_len)
    longest = max(multiples) * seq
    stream = __import__("hybrid_megatron.evaluation.common", fromlist=["token_stream"]).token_stream(
        recipe, num_sequences * (longest + 1) + 1
    )
    out = {"train_seq_length": seq, "bucket": bucket, "num_sequences": num_sequences, "contexts": {}}
    for m in multiples:
        L = m * seq
        per_pos = loss_by_position(model, stream, L, num_sequences)
        out["contexts"][str(L)] = {
            "multiple": m,
            "mean_loss": float(per_pos.mean()),
            "loss_within_train_length": float(per_pos[:seq].mean()),
            "loss_beyond_train_length": float(per_pos[seq:].mean()) if L > seq else None,
            "buckets": bucketize(per_pos, bucket),
        }
    return out


def plot_extrapolation(results: dict[str, dict], path: str | Path) -> Path:
    """PNG of loss vs position (bucket centres) at the longest context, one line per checkpoint.

    ``results`` maps a label to ``extrapolation_curves`` output. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    train_len = None
    for label, res in results.items():
        longest = max(res["contexts"], key=int)
        b = res["contexts"][longest]["buckets"]
        ax.plot(
            [(x["start"] + x["end"]) / 2 for x in b], [x["loss"] for x in b], marker="o", ms=3, label=label
        )
        train_len = res["train_seq_length"]
    if train_len:
        ax.axvline(train_len, color="grey", ls="--", lw=1, label="training length")
    ax.set_xlabel("token position")
    ax.set_ylabel("NLL (nats/token)")
    ax.set_title("Loss by position (length extrapolation)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
