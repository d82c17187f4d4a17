"""RMSNorm for the local (non-Transformer-Engine) implementation, sequence-parallel capable."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class LocalRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm built from a megatron-core config, usable with sequence parallelism.

    megatron-core's WrappedTorchNorm refuses sequence parallelism only because it does not mark
    its weight: with SP each TP rank normalises a different slice of the sequence, so the weight
    gradients are partial sums. Marking the weight ``sequence_parallel`` makes megatron-core's
    ``finalize_model_grads`` all-reduce them across the TP group, as it does for TE's norms.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
