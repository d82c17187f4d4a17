"""``model.fp8_output_layer``: the LM head as a Transformer Engine layer, so FP8 reaches it.

megatron-core builds the output layer as its own ``ColumnParallelLinear`` (a plain bf16 GEMM that
TE's FP8 autocast does not touch) outside the transformer block's FP8 region. At 1b with a 128K
vocabulary that head is about a fifth of the training FLOPs, which bounds FP8's gain
(bench/results/train_throughput_h100_2026-11-24_moe_memory). ``use_fp8_output_layer`` swaps it
for a TE column-parallel linear holding the same weight, run under megatron-core's FP8 context,
with the output layer's calling convention. Checkpoints hold ``output_layer.weight`` only, with
or without the swap, so they load either way: the head's FP8 scaling history is not saved (see
``sharded_state_dict``).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _fp8_output_layer_class():
    """The TE-backed output-layer class; built on first use because megatron-core's TE wrappers
    are stand-ins without Transformer Engine (the CPU build) and cannot be subclassed there."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear
    from megatron.core.fp8_utils import get_fp8_context
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    class FP8OutputLayer(TEColumnParallelLinear):
        """A TE column-parallel linear (no bias) called like megatron-core's output layer:
        ``forward(hidden [s, b, h], weight=None, runtime_gather_output=None)`` returns
        ``(logits [s, b, v/tp] or gathered [s, b, v], None)``. ``gather_output`` is kept here
        because TE's layer refuses it."""

        def __init__(
            self, input_size: int, output_size: int, *, config, init_method, gather_output: bool, tp_group
        ):
            super().__init__(
                input_size,
                output_size,
                config=config,
                init_method=init_method,
                gather_output=False,
                bias=False,
                skip_bias_add=False,
                is_expert=False,
                tp_group=tp_group,
            )
            self.gather_output = gather_output

        def forward(self, hidden, weight=None, runtime_gather_output=None):
            if weight is not None:  # only a tied head passes one; the config refuses that
                raise ValueError(
                    "model.fp8_output_layer: the output layer cannot take the "
                    "embedding's weight (tied embeddings)"
                )
            with get_fp8_context(self.config):
                logits, _ = super().forward(hidden)
            gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
            if gather and self.tp_size > 1:
                logits = gather_from_tensor_model_parallel_region(logits, group=self._tp_group)
            return logits, None

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            """The weight only: GPTModel drops the output layer's extra state from checkpoints
            and insists that it is empty (older checkpoints had none), so TE's FP8 scaling
            history of the head is not saved; after a resume it restarts as at step 1."""
            out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            out.pop(f"{prefix}_extra_state", None)
            return out

    return FP8OutputLayer


def use_fp8_output_layer(model) -> None:
    """Replace ``model.output_layer`` (a megatron-core GPTModel or MambaModel built with
    ``post_process`` and untied embeddings) by an FP8-capable TE layer holding a copy of the
    same initial weight, so that a run with and without the option starts from equal weights.
    Takes the model; returns None. Raises ValueError for a tied or absent output layer."""
    old = getattr(model, "output_layer", None)
    if old is None or getattr(model, "share_embeddings_and_output_weights", False):
        raise ValueError("model.fp8_output_layer: needs a last pipeline stage with an untied output layer")
    config = model.config
    new = _fp8_output_layer_class()(
        config.hidden_size,
        model.vocab_size,
        config=config,
        init_method=lambda w: None,
        gather_output=old.gather_output,
        tp_group=model.pg_collection.tp,
    )
    with torch.no_grad():
        new.weight.copy_(old.weight)
    model.output_layer = new
