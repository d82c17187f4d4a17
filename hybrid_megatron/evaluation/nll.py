"""Validation NLL and perplexity of a checkpoint on held-out data.

By default the data are the trainer's own validation set: the first ``train.eval_iters``
global batches of the valid split, built exactly as the trainer builds them (same sample
counts, hence the same shuffle), so ``nll`` reproduces the ``val/loss`` the trainer logged.
Runs through megatron-core's pipeline schedules, so any TP/PP layout works at load.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def validation_set(recipe, world: int = 1, eval_iters: int | None = None) -> list[list[dict]]:
    """The trainer's validation global batches for ``recipe`` (a list of micro-batch lists).

    ``eval_iters`` overrides ``train.eval_iters``; asking for more samples than the trainer's
    dataset holds builds a larger dataset, whose shuffle (hence samples) differs from the trainer's.
    ``world`` is accepted for callers' convenience and not needed: the sample counts depend on
    the recipe alone, whatever layout the checkpoint is evaluated at (this rank's share follows
    megatron-core's data-parallel state).
    """
    from hybrid_megatron.config.derived import derived
    from hybrid_megatron.config.parallel import ParallelConfig
    from hybrid_megatron.data.datasets import build_gpt_datasets
    from hybrid_megatron.training.data import num_eval_samples, validation_batches

    t = recipe.train
    iters = eval_iters or t.eval_iters
    g = t.global_batch_size
    # Total steps depend on the recipe only; ask derived() on one rank at TP=PP=EP=1 so that
    # neither the training layout nor the evaluation world can fail its divisibility checks.
    total_steps = derived(recipe.model_copy(update={"parallel": ParallelConfig()}), 1)["total_steps"]
    # The trainer's sample counts (training/entry.py: _prepare_data): the dataset's shuffle
    # depends on them, so the same counts give the same validation samples.
    eval_samples = num_eval_samples(t.eval_iters, t.eval_interval or total_steps, total_steps, g)
    eval_samples = max(eval_samples, iters * g)
    _, valid, _ = build_gpt_datasets(
        recipe.data, [total_steps * g, eval_samples, None], model_vocab_size=recipe.model.vocab_size
    )
    if valid is None:
        raise ValueError("the recipe's data have no validation split")
    return validation_batches(valid, g, t.micro_batch_size, iters)


@torch.no_grad()
def evaluate_nll(model, global_batches: list[list[dict]], seq_length: int) -> dict:
    """NLL of ``model`` over ``global_batches`` (lists of micro-batch dicts as the trainer's).

    Runs the trainer's own schedule step (:func:`hybrid_megatron.training.step.
    micro_batch_losses`, forward only), so any TP/PP layout works. Returns ``{"nll",
    "perplexity", "tokens", "nll_micro_batch_mean"}``: ``nll`` is the token-weighted mean over
    all unmasked tokens (each micro-batch's mean times its loss-mask count); ``nll_micro_batch_mean``
    the mean of per-micro-batch means, which is how the trainer averages ``val/loss`` (both agree
    when every micro-batch has the same number of loss tokens, the default without
    ``eod_mask_loss``).
    """
    from hybrid_megatron.training.step import micro_batch_losses

    chunks = model if isinstance(model, list) else [model]
    for c in chunks:
        c.eval()
    acc = torch.zeros(4, dtype=torch.float64)  # sum, count, sum of micro means, micro count
    for micro in global_batches:
        out = micro_batch_losses(chunks, micro, seq_length, forward_only=True)
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            for d, mb in zip(out, micro, strict=True):
                mean = d["lm loss"].detach().double().cpu()
                count = mb["loss_mask"].double().sum()
                acc += torch.stack([mean * count, count, mean, torch.ones((), dtype=torch.float64)])
    if dist.is_initialized():
        # Only the last stage's TP rank 0 contributed: the sum over all ranks is the data-parallel total.
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        acc = acc.to(device)
        dist.all_reduce(acc)
        acc = acc.cpu()
    nll = float(acc[0] / acc[1])
    return {
        "nll": nll,
        "perplexity": math.exp(nll),
        "tokens": int(acc[1]),
        "nll_micro_batch_mean": float(acc[2] / acc[3]),
    }


def run_nll(
    checkpoint: str,
    tp: int = 1,
    pp: int = 1,
    eval_iters: int | None = None,
    data_prefix: str | None = None,
    num_samples: int = 64,
) -> dict:
    """NLL task for one checkpoint; returns a JSON-able dict (``evaluate_nll``'s plus context).

    Without ``data_prefix`` the data are the trainer's validation set (``eval_iters`` global
    batches, default the recipe's). With it, the first ``num_samples`` non-overlapping windows
    of ``data.seq_length + 1`` tokens of that indexed dataset (documents concatenated), shared
    out over data-parallel ranks.
    """
    from hybrid_megatron.evaluation.common import load_for_eval, token_stream

    recipe, model = load_for_eval(checkpoint, tp, pp)
    seq = recipe.data.seq_length
    if data_prefix is None:
        batches = validation_set(recipe, eval_iters=eval_iters)
        source = "trainer validation set"
    else:
        stream = torch.from_numpy(token_stream(recipe, num_samples * seq + 1, prefix=data_prefix))
        micro = recipe.train.micro_batch_size
        samples = [stream[i * seq : i * seq + seq + 1] for i in range(num_samples)]
        batches = []
        for start in range(0, num_samples, micro):
            chunk = torch.stack(samples[start : start + micro])
            tokens, labels = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
            batches.append(
                [
                    {
                        "tokens": tokens,
                        "labels": labels,
                        "loss_mask": torch.ones_like(labels, dtype=torch.float),
                        "position_ids": torch.arange(seq)
                        .unsqueeze(0)
                        .expand(tokens.shape[0], -1)
                        .contiguous(),
                    }
                ]
            )
        # Every rank built every window: data-parallel ranks take turns (else the all-reduced
        # token count would be dp times too large).
        batches = batches[
            parallel_state.get_data_parallel_rank() :: parallel_state.get_data_parallel_world_size()
        ]
        source = f"{data_prefix} ({num_samples} windows of {seq})"
    result = evaluate_nll(model, batches, seq)
    result.update({"checkpoint": str(checkpoint), "data": source, "seq_length": seq, "tp": tp, "pp": pp})
    return result
