"""train.cuda_graphs: megatron-core's per-layer CUDA graphs.

On CPU: the recipe refuses what graphs cannot take (MoE, recompute, TP/PP, fp32) with one line
naming the field, the builder refuses a machine without CUDA, and the TransformerConfig asks
megatron-core for its local per-layer graphs. On a GPU (``-m gpu``): the real trainer with graphs
trains the same losses as without them, the graphs are really replayed, and a graphed run
resumes from its checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from hybrid_megatron.config import RecipeError, load_recipe
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig
from tests.model_configs import tiny_model
from tests.training_helpers import REPO

TINY_INTRA = str(REPO / "recipes" / "intra_tiny.yaml")
GRAPHS_BF16 = ["train.cuda_graphs=true", "train.precision=bf16"]


@pytest.mark.parametrize(
    "recipe, overrides, expected",
    [
        (
            "intra_tiny_moe.yaml",
            ["model.moe.experts=te_grouped"],
            "train.cuda_graphs: MoE layers need model.moe.experts grouped and parallel.ep 1",
        ),
        (
            "intra_tiny_moe.yaml",
            ["parallel.ep=2", "parallel.tp=1", "parallel.sequence_parallel=false"],
            "train.cuda_graphs: MoE layers need model.moe.experts grouped and parallel.ep 1",
        ),
        (
            "intra_tiny.yaml",
            ["train.recompute=full"],
            "train.cuda_graphs: not combined with train.recompute 'full'",
        ),
        ("intra_tiny.yaml", ["parallel.tp=2"], "train.cuda_graphs: only with parallel.tp = parallel.pp = 1"),
        ("intra_tiny.yaml", ["train.precision=fp32"], "train.cuda_graphs: needs train.precision bf16"),
    ],
)
def test_recipe_refuses_what_graphs_cannot_take(recipe, overrides, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(REPO / "recipes" / recipe, [*GRAPHS_BF16, *overrides])
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_recipe_accepts_graphs_for_a_dense_single_gpu_bf16_run():
    assert load_recipe(TINY_INTRA, GRAPHS_BF16).train.cuda_graphs is True


def test_recipe_accepts_graphs_for_grouped_experts_on_one_gpu():
    recipe = load_recipe(
        REPO / "recipes" / "intra_tiny_moe.yaml",
        [*GRAPHS_BF16, "parallel.tp=1", "parallel.sequence_parallel=false"],
    )
    assert recipe.train.cuda_graphs is True and recipe.model.moe.experts == "grouped"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_build_without_cuda_is_one_clear_error(single_rank):
    from hybrid_megatron.config.errors import ModelConfigError
    from hybrid_megatron.models import build_model
    from hybrid_megatron.training.parallel_setup import setup_model_parallel

    setup_model_parallel(ParallelConfig(), seed=1)  # an earlier test may have left another layout
    with pytest.raises(ModelConfigError, match="train.cuda_graphs: needs a GPU"):
        build_model(ModelConfig(**tiny_model("intra")), cuda_graphs=True)


def test_transformer_config_asks_for_megatron_local_layer_graphs(single_rank):
    from megatron.core.transformer.enums import CudaGraphScope  # noqa: F401  (scope type)

    from hybrid_megatron.models.transformer_config import build_transformer_config

    cfg = ModelConfig(**tiny_model("intra"))
    assert build_transformer_config(cfg).cuda_graph_impl == "none"
    graphed = build_transformer_config(cfg, cuda_graphs=True)
    # an empty scope = the whole layer (mixer and FFN)
    assert graphed.cuda_graph_impl == "local" and graphed.cuda_graph_scope == []


def test_fp8_attention_needs_fp8_and_reaches_the_config(single_rank, monkeypatch):
    from hybrid_megatron.models import transformer_config
    from hybrid_megatron.models.transformer_config import build_transformer_config

    # The TE build's fused kernels need TE; this checks only where the recipe field lands.
    monkeypatch.setattr(transformer_config, "resolve_impl", lambda cfg: "local")
    with pytest.raises(ValueError, match="model.fp8_attention: needs model.fp8"):
        ModelConfig(**tiny_model("intra"), fp8_attention=True)
    with pytest.raises(
        ValueError,
        match="model.fp8_attention: TE's cuDNN FP8 attention takes head size 128; "
        "this model's attention heads are 16 wide",
    ):
        ModelConfig(**{**tiny_model("intra"), "impl": "te"}, fp8="hybrid", fp8_attention=True)
    head_128 = {
        **tiny_model("transformer"),
        "impl": "te",
        "attention": {"num_heads": 2, "num_query_groups": 1, "head_dim": 128},
    }
    cfg = ModelConfig(**head_128, fp8="hybrid", fp8_attention=True)
    assert build_transformer_config(cfg).fp8_dot_product_attention is True
    cfg = ModelConfig(**head_128, fp8="hybrid")
    assert build_transformer_config(cfg).fp8_dot_product_attention is False


# ----------------------------------------------------------------------------- GPU
def _train(
    tmp_path, name: str, steps: int, graphs: bool, recipe: str = TINY_INTRA, extra: tuple = ()
) -> tuple[list[float], str]:
    """Run (or resume) the trainer on ``recipe`` (intra_tiny) with TE in bf16 (one rank) in
    ``tmp_path/name``; returns (its per-step losses so far, its log)."""
    from tests.training_helpers import start_job, wait_job

    run_dir = tmp_path / name
    overrides = [
        f"checkpoint.dir={run_dir}/checkpoints",
        "tracking.enabled=false",
        "model.impl=te",
        "train.precision=bf16",
        f"train.steps={steps}",
        "train.eval_interval=10",
        "checkpoint.interval=10",
        "train.log_interval=5",
        f"train.cuda_graphs={'true' if graphs else 'false'}",
        *extra,
    ]
    logs = run_dir / f"logs_{steps}"
    codes = wait_job(start_job(recipe, overrides, 1, logs), timeout=600)
    log = (logs / "rank0.log").read_text()
    assert codes == [0], log[-3000:]
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return [float.fromhex(json.loads(line)["loss"]) for line in lines], log


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_graphed_trainer_matches_eager_and_resumes(tmp_path):
    eager, eager_log = _train(tmp_path, "eager", 20, graphs=False)
    graphed, log = _train(tmp_path, "graphed", 20, graphs=True)
    # intra_tiny has 4 layers; each records in step 1 and replays its graph from step 2 on.
    assert "step 1: CUDA graphs captured for 4 layers" in log, log[-3000:]
    assert "CUDA graphs" not in eager_log
    assert "validation loss" in log  # evaluation replays the forward graphs
    # Step 1 runs eagerly in both (graphs are recorded then): the same computation.
    assert graphed[0] == pytest.approx(eager[0], rel=1e-3)
    # Later steps replay the same kernels; the order of bf16 reductions may differ a little
    # (on an H100 the 20 losses agreed within 8e-5 relative).
    for step, (a, b) in enumerate(zip(eager, graphed), start=1):
        assert b == pytest.approx(a, rel=2e-3), (step, eager, graphed)
    assert sum(graphed[-5:]) < sum(graphed[:5]) - 1.0  # and it learns
    # Both resume from their step-20 checkpoints; the graphed resume (graphs captured anew)
    # continues like the eager one.
    eager_more, _ = _train(tmp_path, "eager", 24, graphs=False)
    graphed_more, log = _train(tmp_path, "graphed", 24, graphs=True)
    assert "at step 20" in log and len(graphed_more) == 24
    for a, b in zip(eager_more[20:], graphed_more[20:]):
        assert b == pytest.approx(a, rel=2e-3), (eager_more, graphed_more)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(
    "settings",
    [
        (),
        # the 1b MoE bench step's settings, one at a time: there capture failed on a copy
        # between host and GPU (bench/results/train_throughput_h100_2026-12-08_recompute/)
        ("train.adam_moments=bf16",),
        ("train.micro_batch_size=1",),  # 8 micro-batches of 1 sequence
    ],
    ids=["default", "bf16_moments", "8_microbatches"],
)
def test_graphed_moe_trainer_matches_eager(tmp_path, settings):
    """MoE layers with the grouped experts (token counts on the GPU) run whole in per-layer
    graphs: the graphed run is captured, replayed and trains the eager run's losses."""
    recipe = str(REPO / "recipes" / "intra_tiny_moe.yaml")
    one_gpu = ("parallel.tp=1", "parallel.sequence_parallel=false", *settings)
    eager, eager_log = _train(tmp_path, "eager", 20, graphs=False, recipe=recipe, extra=one_gpu)
    graphed, log = _train(tmp_path, "graphed", 20, graphs=True, recipe=recipe, extra=one_gpu)
    assert "CUDA graphs captured for" in log and "CUDA graphs" not in eager_log, log[-3000:]
    assert graphed[0] == pytest.approx(eager[0], rel=1e-3)
    for step, (a, b) in enumerate(zip(eager, graphed), start=1):
        assert b == pytest.approx(a, rel=5e-3), (step, eager, graphed)
    assert sum(graphed[-5:]) < sum(graphed[:5]) - 1.0
