"""One optimizer step and one validation pass through megatron-core's pipeline schedules."""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
from megatron.core.utils import get_batch_on_this_cp_rank

from hybrid_megatron.training.data import iterate


def _masked_mean_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Mean loss over the unmasked tokens of one micro-batch (what the schedules average).

    Under context parallelism each rank holds part of every sequence: it returns its share of
    the micro-batch's mean (its masked sum over the count of the whole CP group), and the
    schedule's x CP then cancels DDP's average over the dp x cp gradient group, so the gradient
    is CP=1's. The logged value is the whole micro-batch's mean, the same on every CP rank.
    """
    mask = loss_mask.float()
    local = torch.stack([(per_token_loss.float() * mask).sum(), mask.sum()])
    cp_group = parallel_state.get_context_parallel_group()
    if cp_group.size() == 1:
        loss = local[0] / local[1].clamp(min=1)
        # clone: megatron-core's schedule divides the returned loss in place by the number of
        # micro-batches, and a detached view would share that storage.
        return loss, {"lm loss": loss.detach().clone()}
    total = local.detach().clone()
    dist.all_reduce(total, group=cp_group)
    count = total[1].clamp(min=1)
    return local[0] / count, {"lm loss": total[0] / count}


def _forward_step(data_iterator, model):
    # Under context parallelism this rank keeps its two of the 2 x CP chunks of every sequence.
    batch = get_batch_on_this_cp_rank(dict(next(data_iterator)))
    output = model(
        batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"]
    )
    return output, partial(_masked_mean_loss, batch["loss_mask"])


def _mean_over_world(losses: list[dict]) -> float:
    """Average of the last stage's micro-batch losses, made known to every rank.

    Only the last pipeline stage computes losses; every rank contributes (sum, count) and one
    all-reduce gives every rank the data-parallel mean.
    """
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage() and losses:
        acc[0] = sum(float(d["lm loss"]) for d in losses) / len(losses)
        acc[1] = 1.0
    dist.all_reduce(acc)
    return float(acc[0] / acc[1])


def micro_batch_losses(model_chunks, micro_batches, seq_length: int, forward_only: bool) -> list[dict]:
    """Forward (and backward) over the micro-batches through megatron-core's pipeline schedule.

    Takes the model chunks, this rank's micro-batch dicts (tokens, labels, loss_mask,
    position_ids), the sequence length and whether to skip the backward pass. Returns the
    last pipeline stage's ``{"lm loss": masked mean}`` per micro-batch, in order (an empty
    list on other stages); nothing is reduced across ranks.
    """
    return get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterate(micro_batches),
        model=model_chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )


def run_schedule(model_chunks, micro_batches, seq_length: int, forward_only: bool) -> float:
    """Forward (and backward) over the micro-batches; returns the mean loss on every rank."""
    return _mean_over_world(micro_batch_losses(model_chunks, micro_batches, seq_length, forward_only))


def train_step(model_chunks, optimizer, scheduler, micro_batches, seq_length: int):
    """One optimizer step. Returns (loss, grad_norm, applied).

    A non-finite loss on any rank skips the update on every rank (gradients are dropped, the
    optimizer and LR schedule do not move) and returns ``applied=False``.
    """
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = run_schedule(model_chunks, micro_batches, seq_length, forward_only=False)
    if not torch.isfinite(torch.tensor(loss)):
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        return loss, None, False
    # megatron-core accumulates per-layer MoE aux losses for logging until cleared.
    clear_aux_losses_tracker()
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        return loss, grad_norm, False
    scheduler.step(increment=1)
    return loss, grad_norm, True


@torch.no_grad()
def evaluate(model_chunks, batches: list, seq_length: int) -> float:
    """Mean validation loss over fixed global batches (forward only, eval mode)."""
    for chunk in model_chunks:
        chunk.eval()
    try:
        losses = [run_schedule(model_chunks, b, seq_length, forward_only=True) for b in batches]
    finally:
        for chunk in model_chunks:
            chunk.train()
    return sum(losses) / len(losses)
