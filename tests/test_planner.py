"""The layout planner: cost-balanced pipeline stages, the calibration against the committed
measurements, ``--plan`` and ``--dry-run``'s refusal, and training at PP=2 with balanced stages."""

from __future__ import annotations

import itertools
import json
import random
import shutil

import pytest

from hybrid_megatron.accounting.layout_plan import (
    block_seconds,
    head_seconds,
    plan_layouts,
    predict_layout,
    target_for,
    training_shape,
)
from hybrid_megatron.accounting.memory import RankLayout, TrainingShape, block_memory, stage_memory
from hybrid_megatron.accounting.step_time import load_costs
from hybrid_megatron.config import load_recipe
from hybrid_megatron.config.layer_pattern import build_layer_pattern
from hybrid_megatron.config.layout_search import balanced_stage_layers, candidate_layouts, stage_costs
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.launch.cli import main
from tests.model_configs import wide_model
from tests.training_helpers import REPO, read_losses, start_job, wait_job


def _all_splits(n: int, pp: int):
    for cuts in itertools.combinations(range(1, n), pp - 1):
        bounds = (0, *cuts, n)
        yield [bounds[i + 1] - bounds[i] for i in range(pp)]


def _brute_force(costs, pp, first, last, fits=None):
    best = None
    for layers in _all_splits(len(costs), pp):
        if fits is not None:
            start, ok = 0, True
            for s, count in enumerate(layers):
                ok = ok and fits(s, start, start + count)
                start += count
            if not ok:
                continue
        slowest = max(stage_costs(costs, layers, first, last))
        best = slowest if best is None else min(best, slowest)
    return best


def test_balanced_split_minimises_the_slowest_stage_like_brute_force():
    """Random block costs (with a costly head), every pp: the split's slowest stage equals the
    brute-force minimum over all contiguous splits, and a memory limit is respected."""
    rng = random.Random(0)
    for _ in range(60):
        n, pp = rng.randint(2, 9), rng.randint(1, 4)
        if pp > n:
            continue
        costs = [rng.choice((1.0, 2.5, 4.0, 0.3)) * rng.uniform(0.8, 1.2) for _ in range(n)]
        first, last = rng.uniform(0, 2), rng.uniform(0, 6)
        layers = balanced_stage_layers(costs, pp, first, last)
        assert layers is not None and sum(layers) == n and min(layers) >= 1
        assert max(stage_costs(costs, layers, first, last)) == pytest.approx(
            _brute_force(costs, pp, first, last)
        )
        # memory: no stage may hold more than 3 blocks
        fits = lambda s, a, b: b - a <= 3  # noqa: E731
        limited = balanced_stage_layers(costs, pp, first, last, fits)
        expected = _brute_force(costs, pp, first, last, fits)
        if expected is None:
            assert limited is None
        else:
            assert limited is not None and max(limited) <= 3
            assert max(stage_costs(costs, limited, first, last)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "kind, layout, moe",
    [("inter", "MMAMMAMMMA", False), ("intra", "HMMHMHHMMM", False), ("inter", "MAMMMAMM", True)],
)
def test_balanced_split_of_mixed_hybrids_on_predicted_block_times(kind, layout, moe):
    """Predicted A / M / H / MoE block times of a 1B-wide model at 2 x 8K with the LM head on the
    last stage: the balanced split is the brute-force optimum and beats or ties the even split."""
    experts = {"num_experts": 8, "top_k": 2, "expert_ffn_hidden_size": 4096}
    cfg = wide_model(kind, layout, moe=experts if moe else None)
    layout_ = RankLayout(pp=2)
    # 16K tokens per micro-batch: GPU-bound blocks (at 8K the MoE stack is host-bound, every
    # block the same launch time)
    shape = TrainingShape(seq_len=8192, micro_batch=2, microbatches=8)
    costs = load_costs("h100")
    per_block = block_seconds(cfg, build_layer_pattern(cfg), layout_, shape, costs)
    assert len(set(round(c, 6) for c in per_block)) > 1  # the blocks do cost different amounts
    head = head_seconds(cfg, layout_, shape, costs)
    for pp in (2, 3, 4):
        layers = balanced_stage_layers(per_block, pp, 0.0, head)
        assert layers is not None
        slowest = max(stage_costs(per_block, layers, 0.0, head))
        assert slowest == pytest.approx(_brute_force(per_block, pp, 0.0, head))
        if len(per_block) % pp == 0:
            even = [len(per_block) // pp] * pp
            assert slowest <= max(stage_costs(per_block, even, 0.0, head)) + 1e-12


def test_calibration_table_recomputes_and_keeps_its_targets():
    """The committed calibration table is what the committed measurements and the model give
    now: same rows, predictions equal, and every row that met a target still meets it."""
    from bench.planner_calibration import RESULTS, calibration_table

    committed = json.loads((RESULTS / "2026-12-07_planner_calibration" / "calibration.json").read_text())
    now = calibration_table()
    assert len(now["rows"]) == len(committed["rows"]) > 50
    for old, new in zip(committed["rows"], now["rows"], strict=True):
        assert (old["source"], old["config"]) == (new["source"], new["config"])
        assert new["predicted_memory_gib"] == pytest.approx(old["predicted_memory_gib"], rel=1e-9)
        assert new["predicted_tokens_per_s"] == pytest.approx(old["predicted_tokens_per_s"], rel=1e-9)
        if old["memory_meets"]:
            assert abs(new["memory_error"]) <= 0.10, new
        if old["time_meets"]:
            assert abs(new["time_error"]) <= 0.15, new
    # the current code's single-GPU 1B rows all meet the memory target, the MoE rows with bf16
    # moments through their optimizer-step phase
    current_1b = [r for r in now["rows"] if r["code"] == "fused" and " 1b " in f" {r['config']} "]
    assert all(r["memory_meets"] for r in current_1b)
    assert sum("moe" in r["config"] for r in current_1b) >= 8
    # and the time target without recompute, but for the one row the README names: the MoE step
    # at 8 micro-batches, host-bound on its machine (GPU busy 74%)
    timed = [r for r in current_1b if r["time_meets"] is not None and r["recompute"] == "none"]
    misses = {(r["source"], r["config"]) for r in timed if not r["time_meets"]}
    assert len(timed) >= 20
    assert misses == {
        (
            "train_throughput_h100_2026-12-07_recompute/run5_1b_inter_moe_8mb.json",
            "inter 1b moe mbs 1 x 8 experts=grouped",
        )
    }
    # every recompute mode is calibrated, and full recompute closely: its peak is the logits'
    # phase or the recomputed block's, not both (rows measured in a process an earlier MoE row
    # had used carry that row's memory: out)
    for mode in ("selective", "full"):
        rows = [r for r in now["rows"] if r["recompute"] == mode and r["code"] != "reused process"]
        assert len(rows) >= 5 and all(r["memory_meets"] for r in rows), mode
    full = [r for r in now["rows"] if r["recompute"] == "full" and r["code"] != "reused process"]
    assert len(full) >= 30 and max(abs(r["memory_error"]) for r in full) < 0.03


def test_long_context_lengths_are_predicted_and_those_out_of_memory_exceed_the_cap():
    """The 1B long-context sweep (8K to 128K, full recompute) is predicted within 1% at every
    measured length, and every length that ran out of memory is predicted above the sweep's cap
    while every measured one is below it."""
    from bench.planner_calibration import RESULTS, long_context_item, long_context_rows, predict_bench_row
    from hybrid_megatron.accounting.step_time import load_costs

    costs = load_costs("h100")
    measured = long_context_rows()
    assert len(measured) >= 20 and max(r["row"]["seq_length"] for r in measured) >= 131072
    for item in measured:
        predicted = predict_bench_row(item, costs)["memory_gib"]
        assert predicted == pytest.approx(item["row"]["peak_memory_gib"], rel=0.01), item["row"]
    record = json.loads((RESULTS / "long_context_1gpu" / "sweep.json").read_text())
    cap = record["max_memory_gib"]
    out_of_memory = [r for r in record["rows"] if r.get("oom")]
    assert {r["kind"] for r in out_of_memory} == {"transformer", "swa", "mamba", "inter", "intra"}
    for entry in record["rows"]:
        predicted = predict_bench_row(long_context_item(record, entry), costs)["memory_gib"]
        assert (predicted > cap) == bool(entry.get("oom")), (entry["kind"], entry["seq_length"], predicted)


def test_full_recompute_peaks_in_the_logits_phase_or_the_recompute_phase():
    """Under full recompute the last stage holds the saved block inputs plus the larger of (the
    logits and the head's inputs) and (one recomputed block), never both; a stage without the
    head holds the recomputed block on top of its inputs."""
    recipe = load_recipe(REPO / "recipes" / "inter_1b.yaml")
    cfg, pattern = recipe.model, build_layer_pattern(recipe.model)
    full = TrainingShape(8192, 2, 1, recompute="full")

    def inputs_and_block(c, stage_pattern):
        blocks = [block_memory(c, letter, full, RankLayout()) for letter in stage_pattern]
        return sum(b.kept for b in blocks), max(b.recompute_peak for b in blocks)

    # the 128K vocabulary's logits outweigh one recomputed block: the head's phase is the peak,
    # and more vocabulary adds logits only
    kept, block = inputs_and_block(cfg, pattern)
    whole = stage_memory(cfg, pattern, 0, RankLayout(), full).parts
    assert kept < whole["activations"] < kept + block < whole["logits"]
    wide_vocab = cfg.model_copy(update={"vocab_size": 2 * cfg.vocab_size})
    wider = stage_memory(wide_vocab, pattern, 0, RankLayout(), full)
    assert wider.parts["activations"] == pytest.approx(whole["activations"])
    assert wider.parts["logits"] == pytest.approx(2 * whole["logits"])
    # a 256-entry vocabulary: the recomputed block sets the peak
    tiny_vocab = cfg.model_copy(update={"vocab_size": 256})
    kept, block = inputs_and_block(tiny_vocab, pattern)
    small = stage_memory(tiny_vocab, pattern, 0, RankLayout(), full).parts
    assert small["activations"] + small["logits"] == pytest.approx(kept + block)
    # the first of two stages has no head: inputs plus the recomputed block
    kept, block = inputs_and_block(cfg, pattern[:6])
    first = stage_memory(cfg, pattern[:6], 0, RankLayout(pp=2), full).parts
    assert first["logits"] == 0 and first["activations"] == pytest.approx(kept + block)


def test_bf16_moments_peak_in_the_optimizer_step_when_it_outweighs_the_activations(capsys):
    """With bf16 Adam moments, main weights take 2 bytes (the weight plus a 16-bit remainder),
    and TE's fused Adam's fp32 copies of both moments (8 bytes per optimizer parameter) come on
    top of what stays resident once the activations are freed: the peak is the larger phase."""
    recipe = load_recipe(REPO / "recipes" / "intra_1b_moe.yaml")
    cfg, pattern = recipe.model, build_layer_pattern(recipe.model)
    fp32 = TrainingShape(8192, 1, 2, recompute="full")
    bf16 = TrainingShape(8192, 1, 2, recompute="full", adam_moments="bf16")
    with_fp32 = stage_memory(cfg, pattern, 0, RankLayout(), fp32).parts
    step = stage_memory(cfg, pattern, 0, RankLayout(), bf16)
    params = with_fp32["gradients"] / 4
    # fp32: 4 (main) + 8 (moments) bytes per parameter; bf16: 2 + 4, plus the step's 8
    assert with_fp32["optimizer"] == pytest.approx(12 * params)
    assert step.parts["optimizer"] == pytest.approx(6 * params)
    assert step.parts["optimizer_step"] == pytest.approx(8 * params)
    assert "activations" not in step.parts and step.largest[0] == "optimizer_step"
    resident = ("weights", "gradients", "optimizer", "overhead")
    assert step.total == pytest.approx(sum(step.parts[k] for k in resident) + 8 * params)
    # 2 data-parallel ranks shard the state, and the step's copies with it
    halved = stage_memory(cfg, pattern, 0, RankLayout(dp=2), bf16).parts
    assert halved["optimizer_step"] == pytest.approx(4 * params)
    # no recompute at 4 x 8K tokens: the activations' phase outweighs the step's again
    wide = stage_memory(cfg, pattern, 0, RankLayout(), TrainingShape(8192, 4, 2, adam_moments="bf16"))
    assert "optimizer_step" not in wide.parts and wide.parts["activations"] > 8 * params
    # on a 66 GiB GPU the plan's one-GPU row is the step's phase: its copies under "optim"
    args = [str(REPO / "recipes" / "intra_1b_moe.yaml"), "--plan", "--gpus", "1", "--gpu-memory", "66"]
    assert main([*args, "train.adam_moments=bf16"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tp1 cp1 pp1")][0].split()
    mem, weights, grads, optim, activ = (float(x) for x in row[8:13])
    assert activ == 0 and optim == pytest.approx(mem - weights - grads - 0.6, abs=0.11)


def test_plan_lists_every_valid_layout_best_first(capsys):
    recipe_path = str(REPO / "recipes" / "intra_1b_moe.yaml")
    assert main([recipe_path, "--plan", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    recipe = load_recipe(recipe_path)
    expected = list(candidate_layouts(recipe.model, 8, recipe.parallel, recipe.data.seq_length))
    rows = [line for line in out.splitlines() if line.startswith("tp")]
    predictions = plan_layouts(recipe, target_for(recipe, 8))
    # one row per layout, + the recipe's own configuration unless a searched row is the same
    assert len(rows) == len(predictions) in (len(expected), len(expected) + 1) and len(expected) > 10
    assert {p.parallel.cp for p in predictions} == {1, 2, 4, 8}  # 8192 positions split 16 ways
    assert "8 GPUs of 80 GiB" in out and "weights" in out and "MFU" in out
    assert sum(line.endswith("<- recipe") for line in rows) == 1
    speeds = [p.time.tokens_per_s for p in predictions if p.fits]
    assert speeds == sorted(speeds, reverse=True)
    assert rows[0].split()[:4] == predictions[0].name().split()[:4]
    # a small GPU: the layouts that do not fit come last, marked NO
    assert main([recipe_path, "--plan", "--gpus", "8", "--gpu-memory", "24"]) == 0
    small = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tp")]
    fits = [line.removesuffix("<- recipe").split()[-1] == "yes" for line in small]
    assert True in fits and False in fits and fits == sorted(fits, reverse=True)


def test_dry_run_refuses_a_layout_predicted_not_to_fit(capsys):
    recipe_path = str(REPO / "recipes" / "intra_1b_moe.yaml")
    # the cluster recipe's data paths are placeholders: the dry run checks inputs first
    inputs = [f"data.tokenizer={REPO}/data/tokenizer", f"data.blend={REPO}/data/austen_4k_text_document"]
    assert main([recipe_path, "--dry-run", *inputs]) == 0
    assert "stage 0:" in capsys.readouterr().out
    code = main([recipe_path, "--dry-run", "--gpu-memory", "16", *inputs])
    err = capsys.readouterr().err
    assert code == 2
    recipe = load_recipe(recipe_path)
    p = predict_layout(recipe, recipe.parallel, target_for(recipe, None, 16))
    assert f"{p.peak.total_gib:.1f} GiB per GPU of 16 GiB" in err
    assert "largest part is activations" in err and "nothing submitted" not in err


def test_memory_parts_follow_the_layout():
    """Experts shard over EP, optimizer state over DP, activations over TP with SP, and the
    first stage of a 1F1B pipeline holds pp micro-batches."""
    recipe = load_recipe(REPO / "recipes" / "intra_1b_moe.yaml")
    cfg, pattern = recipe.model, build_layer_pattern(recipe.model)
    shape = TrainingShape(seq_len=8192, micro_batch=1, microbatches=8)
    one = stage_memory(cfg, pattern, 0, RankLayout(), shape).parts
    ep2 = stage_memory(cfg, pattern, 0, RankLayout(ep=2, dp=2), shape).parts
    assert ep2["weights"] < one["weights"] and ep2["optimizer"] < one["optimizer"] / 1.9
    tp2 = stage_memory(cfg, pattern, 0, RankLayout(tp=2, sequence_parallel=True), shape).parts
    assert tp2["activations"] == pytest.approx(one["activations"] / 2, rel=0.01)
    # the dispatcher gathers the experts' input copies over expert TP, not their output copies
    tp2_etp2 = stage_memory(cfg, pattern, 0, RankLayout(tp=2, expert_tp=2, sequence_parallel=True), shape)
    assert tp2["moe_dispatch"] == pytest.approx(one["moe_dispatch"] / 2)
    assert tp2_etp2.parts["moe_dispatch"] == pytest.approx(one["moe_dispatch"] * 3 / 4)
    first = stage_memory(cfg, pattern[:7], 0, RankLayout(pp=2), shape).parts
    last = stage_memory(cfg, pattern[7:], 1, RankLayout(pp=2), shape).parts
    assert first["logits"] == 0 and last["logits"] > 0
    per_block_first = first["activations"] / 7
    assert per_block_first > 1.5 * (last["activations"] / 6)  # 2 micro-batches in flight vs 1
    full = stage_memory(cfg, pattern, 0, RankLayout(), TrainingShape(8192, 1, 8, recompute="full")).parts
    assert full["activations"] < one["activations"] / 3


@pytest.mark.slow
def test_pp2_balanced_trains_the_same_losses_as_pp1(tmp_path):
    """inter_tiny (MAMM): one rank trains 8 steps; from its step-4 checkpoint two gloo ranks at
    PP=2 with pp_split balanced (the planner's split) train steps 5-8 to the same losses (fp32;
    a fresh PP=2 run would draw other initial weights: megatron-core seeds each stage)."""
    recipe = str(REPO / "recipes" / "inter_tiny.yaml")
    common = [
        "train.steps=8",
        "train.warmup_steps=1",
        "train.log_interval=1",
        "train.eval_interval=0",
        "train.deterministic=true",
        "tracking.enabled=false",
        "checkpoint.interval=4",
    ]
    ref, pp = tmp_path / "pp1", tmp_path / "pp2"
    assert wait_job(start_job(recipe, [f"checkpoint.dir={ref}/ckpt", *common], 1, ref / "logs")) == [0]
    shutil.copytree(ref / "ckpt" / "step_00000004", pp / "start" / "step_00000004")
    balanced = ["parallel.pp=2", "parallel.pp_split=balanced"]
    resume = [f"checkpoint.dir={pp}/ckpt", f"checkpoint.resume={pp}/start/step_00000004", *common, *balanced]
    assert wait_job(start_job(recipe, resume, 2, pp / "logs")) == [0, 0]
    reference, losses = read_losses(ref), read_losses(pp)
    assert sorted(losses) == [5, 6, 7, 8]
    for step in losses:
        a, b = float.fromhex(losses[step]), float.fromhex(reference[step])
        assert abs(a - b) < 1e-4, (step, a, b)
    loaded = load_recipe(recipe, balanced)
    resolved = predict_layout(loaded, loaded.parallel, target_for(loaded, 2)).parallel
    assert resolved.pipeline_stage_layers is not None and sum(resolved.pipeline_stage_layers) == 4
    layout, shape = training_shape(loaded, ParallelConfig(pp=2), 2)
    assert shape.microbatches == 2 and layout.dp == 1
