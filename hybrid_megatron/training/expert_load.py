"""MoE load balance: how many tokens each expert of each MoE layer received in training.

megatron-core's routers return ``(probs, routing_map)``, the routing map marking each token's
chosen experts; a forward hook on every router adds up its columns during training forwards
(eval and no-grad forwards are not counted). Every ``window`` steps the counts are summed over
the data-parallel ranks (and the pipeline stages, each holding its own layers) and turned into
scale-free figures per layer: each expert's share of the routed tokens and the busiest
expert's load over the mean load (1.0 is perfect balance). Only shares are reported, so
activation recomputation (which runs a router twice) does not change them. Routers inside
captured CUDA graphs run without Python, so under ``train.cuda_graphs`` nothing is counted.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _routers(model_chunks) -> list:
    from megatron.core.transformer.moe.router import Router

    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, Router)]


class ExpertLoad:
    """Counts tokens per expert per MoE layer (see the module docstring).

    Takes this rank's model chunks, the reporting window in steps and whether the run uses
    sequence parallelism (``parallel.sequence_parallel``). Building it is collective (the ranks
    agree on the table's size: pipeline stages hold different layers). A model without routers
    counts nothing and reports nothing.
    """

    def __init__(self, model_chunks, window: int, sequence_parallel: bool = False):
        routers = _routers(model_chunks)
        self.window = max(1, window)
        self._handles: list = []
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        # megatron-core numbers layers from 1 across all stages
        rows = [r.layer_number if r.layer_number is not None else i + 1 for i, r in enumerate(routers)]
        size = torch.tensor(
            [len(routers), max(rows, default=0), max((r.config.num_moe_experts for r in routers), default=0)],
            device=device,
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(size, op=dist.ReduceOp.MAX)
        self.active = bool(size[0])
        self.sequence_parallel = sequence_parallel
        if not self.active:
            return
        self.counts = torch.zeros(int(size[1]), int(size[2]), dtype=torch.float64, device=device)
        for row, router in zip(rows, routers):
            self._handles.append(router.register_forward_hook(self._hook(row - 1)))

    def _hook(self, row: int):
        def count(module, inputs, output) -> None:
            if module.training and torch.is_grad_enabled():
                routing_map = output[1]
                self.counts[row] += routing_map.reshape(-1, routing_map.shape[-1]).sum(dim=0).double()

        return count

    def of_step(self, step: int) -> dict[str, float]:
        """The ``moe/*`` metrics at the end of a window (``step`` a multiple of the window):
        per layer N ``moe/layerN/max_over_mean`` and ``moe/layerN/expert{E}_fraction``, and over
        all layers ``moe/max_over_mean`` (the worst layer); {} on other steps. Collective: every
        rank calls it at every step."""
        if not self.active or step % self.window:
            return {}
        counts = self.counts.clone()
        self.counts.zero_()
        if dist.is_available() and dist.is_initialized():
            from megatron.core import parallel_state

            # Each data-parallel (and context-parallel) rank routes its own tokens, each pipeline
            # stage its own layers, and with sequence parallelism each tensor-parallel rank its
            # share of the sequence (megatron-core's MoE with tp > 1 requires it).
            groups = [
                parallel_state.get_data_parallel_group(with_context_parallel=True),
                parallel_state.get_pipeline_model_parallel_group(),
            ]
            if self.sequence_parallel:
                groups.append(parallel_state.get_tensor_model_parallel_group())
            for group in groups:
                if dist.get_world_size(group) > 1:
                    dist.all_reduce(counts, group=group)
        return load_metrics(counts.cpu())

    def remove(self) -> None:
        """Detach the hooks from the routers."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def load_metrics(counts: torch.Tensor) -> dict[str, float]:
    """Shares and max-over-mean load per layer from a [layers, experts] count table; layers
    that routed no token are left out."""
    metrics: dict[str, float] = {}
    worst = 0.0
    for row, per_expert in enumerate(counts.tolist()):
        total = sum(per_expert)
        if total <= 0:
            continue
        ratio = max(per_expert) / (total / len(per_expert))
        worst = max(worst, ratio)
        metrics[f"moe/layer{row + 1}/max_over_mean"] = ratio
        for expert, tokens in enumerate(per_expert):
            metrics[f"moe/layer{row + 1}/expert{expert}_fraction"] = tokens / total
    if metrics:
        metrics["moe/max_over_mean"] = worst
    return metrics
