"""build_model: ModelConfig -> a megatron-core GPTModel holding this pipeline stage's blocks."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from hybrid_megatron.config.errors import ModelConfigError
from hybrid_megatron.config.layer_pattern import (
    ATTENTION_LETTERS,
    INTRA,
    build_layer_pattern,
    split_pattern,
)
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.config.parallel_layout import check_parallel_layout
from hybrid_megatron.models.moe import keep_token_counts_on_device
from hybrid_megatron.models.output_layer import use_fp8_output_layer
from hybrid_megatron.models.specs import backend_for, block_spec, rms_norm_spec
from hybrid_megatron.models.transformer_config import build_transformer_config, resolve_impl


def _pipeline_layout(stages: list[str]) -> list[list[str]] | None:
    """megatron-core's explicit layout for uneven stages (None when the split is even)."""
    if len({len(s) for s in stages}) == 1:
        return None
    layout = [["decoder"] * len(s) for s in stages]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


def build_model(
    model_config: ModelConfig,
    pre_process: bool = True,
    post_process: bool = True,
    parallel: ParallelConfig | None = None,
    bf16: bool = False,
    recompute: str = "none",
    cuda_graphs: bool = False,
) -> GPTModel:
    """Build this rank's part of the language model.

    Takes the validated ModelConfig, whether this pipeline stage holds the embedding
    (``pre_process``) and the output layer (``post_process``), the ParallelConfig (for
    sequence parallelism and explicit per-stage layer counts; sizes are read from megatron-core's
    initialised parallel state), whether training runs in bf16, the activation recomputation
    (``train.recompute``: none | selective | full) and whether layers run in CUDA graphs
    (``train.cuda_graphs``; GPU only). megatron-core's model-parallel state and RNG tracker must
    be initialised (``setup_model_parallel``, with the same ``cuda_graphs``).

    Returns a megatron-core GPTModel with GPTModel's calling convention:
    ``forward(input_ids, position_ids, attention_mask, labels=None)`` gives logits [b, s, v/tp]
    or, with labels, the per-token loss [b, s]. Raises ModelConfigError (or pydantic's
    ValidationError upstream) naming the bad field.
    """
    parallel = parallel or ParallelConfig()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    check_parallel_layout(model_config, parallel, tp, ep, cp)
    if cuda_graphs and not torch.cuda.is_available():
        raise ModelConfigError("train.cuda_graphs: needs a GPU (this process sees no CUDA device)")

    pattern = build_layer_pattern(model_config)
    if parallel.pp_split == "balanced" and parallel.pipeline_stage_layers is None:
        raise ModelConfigError(
            "parallel.pp_split: balanced stages must be resolved to pipeline_stage_layers before "
            "building (training.model_setup.resolved_parallel)"
        )
    stages = split_pattern(pattern, pp, parallel.pipeline_stage_layers)
    stage_pattern = stages[parallel_state.get_pipeline_model_parallel_rank()]

    tconfig: TransformerConfig = build_transformer_config(
        model_config,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_layout=_pipeline_layout(stages),
        bf16=bf16,
        recompute=recompute,
        cuda_graphs=cuda_graphs,
    )
    impl = resolve_impl(model_config)
    block = TransformerBlockSubmodules(
        layer_specs=[block_spec(letter, model_config, tconfig, impl, parallel) for letter in stage_pattern],
        layer_norm=rms_norm_spec(backend_for(impl)),
    )
    # NemotronH attention has no position embedding at all; llama attention uses RoPE.
    rope = model_config.flavour == "llama" and any(c in pattern for c in (*ATTENTION_LETTERS, INTRA))
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block,
        vocab_size=model_config.vocab_size,
        max_sequence_length=model_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model_config.tie_embeddings,
        position_embedding_type="rope" if rope else "none",
        rotary_base=int(model_config.attention.rotary_base) if rope else 10000,
    )
    if model_config.fp8_output_layer and post_process and impl == "te":
        # Not on a local build (impl auto without a GPU): there FP8 is off altogether.
        use_fp8_output_layer(model)
    if model_config.moe is not None and model_config.moe.experts == "grouped":
        keep_token_counts_on_device(model)
    model.layer_pattern = pattern
    model.stage_pattern = stage_pattern
    return model
