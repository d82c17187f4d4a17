"""Training and validation batches: megatron-core GPTDatasets read in a resumable order.

Sample order is fully determined by the dataset's own (seeded) shuffle and the number of
samples consumed so far, so a resumed run reads exactly the batches the uninterrupted run
would have read.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core import parallel_state


class ResumableBatches:
    """Micro-batches of one data-parallel rank, starting after ``consumed_samples``.

    Global batch ``g`` covers dataset samples ``[g*G, (g+1)*G)`` (``G`` = global batch size);
    DP rank ``r`` takes the ``r``-th slice of ``G/dp`` samples and yields it as micro-batches.
    Indices wrap around the dataset length (a dataset built for fewer samples is re-read).
    """

    def __init__(self, dataset, global_batch: int, micro_batch: int, consumed_samples: int = 0):
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.consumed = consumed_samples

    def _sample(self, index: int) -> dict:
        item = self.dataset[index % len(self.dataset)]
        return {k: torch.as_tensor(v) for k, v in item.items()}

    def next_global_batch(self) -> list[dict]:
        """Return this rank's micro-batches of the next global batch; advances the position."""
        per_rank = self.global_batch // self.dp_size
        start = self.consumed + self.dp_rank * per_rank
        micro = []
        for m in range(0, per_rank, self.micro_batch):
            samples = [self._sample(start + m + i) for i in range(self.micro_batch)]
            micro.append({k: torch.stack([s[k] for s in samples]) for k in samples[0]})
        self.consumed += self.global_batch
        return micro


def to_device(batch: dict) -> dict:
    """Move a batch to the current CUDA device (a no-op on CPU)."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.cuda(non_blocking=True) for k, v in batch.items()}


def iterate(micro_batches: list[dict]) -> Iterator[dict]:
    """An iterator over micro-batches, moved to the device, as the schedules expect."""
    return (to_device(b) for b in micro_batches)


def num_eval_samples(eval_iters: int, eval_interval: int, steps: int, global_batch: int) -> int:
    """Validation samples needed: eval_iters global batches per evaluation, every evaluation."""
    if eval_interval <= 0 or eval_iters <= 0:
        return 0
    evaluations = steps // eval_interval + 1
    return evaluations * eval_iters * global_batch


def validation_batches(dataset, global_batch: int, micro_batch: int, eval_iters: int) -> list | None:
    """The fixed validation set: the first ``eval_iters`` global batches, the same every time."""
    if dataset is None or eval_iters <= 0:
        return None
    reader = ResumableBatches(dataset, global_batch, micro_batch)
    return [reader.next_global_batch() for _ in range(eval_iters)]
