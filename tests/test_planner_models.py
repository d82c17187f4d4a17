"""The layout planner's context-parallel, FP8 and micro-batch/recompute models: memory parts,
step-time terms and the layouts ``--plan`` lists, each against numbers worked out here."""

from __future__ import annotations

import json

import pytest

from hybrid_megatron.accounting.layout_plan import plan_layouts, target_for
from hybrid_megatron.accounting.memory import (
    GIB,
    RankLayout,
    TrainingShape,
    block_activation_bytes,
    cp_buffer_bytes,
    stage_memory,
)
from hybrid_megatron.accounting.step_time import (
    ATTENTION_CORE,
    block_comm_seconds,
    block_term_seconds,
    cp_comm_seconds,
    load_costs,
    predict_step,
)
from hybrid_megatron.config import load_recipe
from hybrid_megatron.config.geometry import attention_dims, mamba_dims
from hybrid_megatron.config.layer_pattern import build_layer_pattern
from hybrid_megatron.config.layout_search import candidate_layouts
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig
from tests.model_configs import wide_model
from tests.training_helpers import REPO

# ---- context parallelism: memory ------------------------------------------------------------


def test_cp_divides_activations_logits_and_optimizer_state():
    """At cp 2 every sequence-sharded part is half of cp 1's (heads-mode Mamba: no extra
    tensors), the optimizer state shards over dp x cp, weights and gradients stay."""
    cfg = wide_model()
    pattern = build_layer_pattern(cfg)
    shape = TrainingShape(seq_len=32768, micro_batch=1, microbatches=4)
    one = stage_memory(cfg, pattern, 0, RankLayout(), shape).parts
    two = stage_memory(cfg, pattern, 0, RankLayout(cp=2, mamba_cp="heads"), shape).parts
    for part in ("activations", "logits"):
        assert two[part] == pytest.approx(one[part] / 2, rel=1e-12)
    assert two["optimizer"] == pytest.approx(one["optimizer"] / 2, rel=1e-12)
    assert two["weights"] == one["weights"] and two["gradients"] == one["gradients"]
    assert one["cp_buffers"] == 0 and two["cp_buffers"] > 0


def test_cp_sequence_mode_keeps_the_conv_output_and_gathers_small_states():
    """The sequence-sharded scan saves the conv1d output (conv_dim bf16 per position) on top of
    the fused path's tensors; its state exchange holds 2 x cp segments' fp32 states."""
    cfg = wide_model()
    m = mamba_dims(cfg, "M")
    assert m is not None
    shape = TrainingShape(seq_len=32768, micro_batch=1)
    heads = block_activation_bytes(cfg, "M", shape, RankLayout(cp=4, mamba_cp="heads"))[0]
    seq = block_activation_bytes(cfg, "M", shape, RankLayout(cp=4, mamba_cp="sequence"))[0]
    assert seq - heads == pytest.approx(m.conv_dim * 32768 / 4 * 2)
    states = cp_buffer_bytes(cfg, "M", shape, RankLayout(cp=4, mamba_cp="sequence"))
    assert states == pytest.approx(2 * 4 * m.heads * (m.head_dim * m.state + 1) * 4)
    assert states < 0.02 * heads  # small next to the block's activations (1% here)


def test_cp_attention_buffers_by_exchange():
    """One attention layer in flight: all_gather holds the full-sequence K/V and their
    gradients, p2p two K/V and two dK/dV blocks of seq/cp, a2a one head-split Q, K, V, O."""
    cfg = wide_model()
    a = attention_dims(cfg, "A")
    assert a is not None
    seq, cp, tp = 65536, 4, 2
    shape = TrainingShape(seq_len=seq, micro_batch=1)
    kv = 2 * a.groups * a.head_dim / tp  # K and V channels per TP rank
    layouts = {
        c: RankLayout(tp=tp, cp=cp, cp_comm=c, sequence_parallel=True) for c in ("all_gather", "p2p", "a2a")
    }
    assert cp_buffer_bytes(cfg, "A", shape, layouts["all_gather"]) == pytest.approx(2 * kv * seq * 2)
    assert cp_buffer_bytes(cfg, "A", shape, layouts["p2p"]) == pytest.approx(4 * kv * seq / cp * 2)
    assert cp_buffer_bytes(cfg, "A", shape, layouts["a2a"]) == pytest.approx(
        (a.qkv_width + a.width) / tp * seq / cp * 2
    )
    # one layer at a time: the stage's part is its largest block's, not a sum over blocks
    stage = stage_memory(cfg, "AAAA", 0, layouts["all_gather"], shape).parts["cp_buffers"]
    assert stage == pytest.approx(2 * kv * seq * 2)


# ---- context parallelism: step time ---------------------------------------------------------


def test_cp_splits_every_flop_term_over_the_ranks():
    """Every FLOP term per rank (the causal attention core included: the 2 x cp chunk order
    balances it) at cp 4 is a quarter of cp 1's."""
    cfg = wide_model()
    costs = load_costs("h100")
    shape = TrainingShape(seq_len=65536, micro_batch=1)
    one = block_term_seconds(cfg, "A", shape, RankLayout(), costs)
    four = block_term_seconds(cfg, "A", shape, RankLayout(cp=4), costs)
    assert set(one) == set(four) and set(ATTENTION_CORE) <= set(one)
    for name in one:
        assert four[name] == pytest.approx(one[name] / 4, rel=1e-12)


def test_cp_communication_terms():
    """all_gather: 3 collectives of the full-sequence K/V at the node's bus bandwidth; p2p: the
    same bytes, hidden behind the attention core when it is longer (only latency left); a2a
    and heads-mode Mamba: Q, K, V, O (in-proj output and scan output) there and back."""
    cfg = wide_model()
    costs = load_costs("h100")
    a, m = attention_dims(cfg, "A"), mamba_dims(cfg, "M")
    assert a is not None and m is not None
    seq, cp = 65536, 4
    shape = TrainingShape(seq_len=seq, micro_batch=1)
    bw, lat = costs.node_bus_gbps * 1e9, costs.collective_latency_s
    kv_bytes = 2 * a.groups * a.head_dim * seq * 2
    gather = cp_comm_seconds(cfg, "A", shape, RankLayout(cp=cp, cp_comm="all_gather"), costs)
    assert gather == pytest.approx(3 * (0.75 * kv_bytes / bw + lat))
    ring = cp_comm_seconds(cfg, "A", shape, RankLayout(cp=cp, cp_comm="p2p"), costs)
    core = sum(block_term_seconds(cfg, "A", shape, RankLayout(cp=cp), costs)[n] for n in ATTENTION_CORE)
    assert core > 3 * 0.75 * kv_bytes / bw  # long sequence: the ring hides behind the core
    assert ring == pytest.approx(3 * lat)
    a2a = cp_comm_seconds(cfg, "A", shape, RankLayout(cp=cp, cp_comm="a2a"), costs)
    assert a2a == pytest.approx(2 * (a.qkv_width + a.width) * seq / cp * 2 * 0.75 / bw + 4 * lat)
    heads = cp_comm_seconds(cfg, "M", shape, RankLayout(cp=cp, mamba_cp="heads"), costs)
    assert heads == pytest.approx(2 * (m.in_proj_width + m.d_inner) * seq / cp * 2 * 0.75 / bw + 4 * lat)
    assert cp_comm_seconds(cfg, "A", shape, RankLayout(), costs) == 0.0
    # the block's communication includes it
    plain = block_comm_seconds(cfg, "A", shape, RankLayout(cp=cp, cp_comm="all_gather"), costs)
    assert plain == pytest.approx(gather)


def test_cp_step_counts_tokens_of_the_data_parallel_ranks_only():
    """cp 2 x dp 1 and cp 1 x dp 2 on 2 GPUs train the same tokens per step; the CP step's
    throughput is the tokens over its step time, per GPU over both GPUs."""
    cfg = wide_model()
    costs = load_costs("h100")
    pattern = build_layer_pattern(cfg)
    shape = TrainingShape(seq_len=65536, micro_batch=1, microbatches=4)
    cp2 = predict_step(cfg, [pattern], RankLayout(cp=2, cp_comm="all_gather"), shape, costs)
    assert cp2.tokens_per_s == pytest.approx(65536 * 4 / cp2.step_s)
    assert cp2.tokens_per_s_per_gpu == pytest.approx(cp2.tokens_per_s / 2)
    one = predict_step(cfg, [pattern], RankLayout(), shape, costs)
    # half the work per rank plus the exchanges: between 1x and 2x one GPU's throughput
    assert one.tokens_per_s < cp2.tokens_per_s < 2 * one.tokens_per_s


# ---- context parallelism: the layouts --plan lists ----------------------------------------------


def _cps(cfg: ModelConfig, gpus: int, base: ParallelConfig, seq: int | None) -> set[int]:
    return {p.cp for p in candidate_layouts(cfg, gpus, base, seq)}


def test_cp_layouts_are_listed_only_where_the_checks_allow():
    """seq_length must split into 2 x cp chunks; heads-mode Mamba needs its heads to divide
    by tp x cp; a2a needs the attention heads and groups to; p2p takes no sliding window."""
    cfg = wide_model()  # 64 Mamba heads, 32 attention heads, 8 KV groups
    base = ParallelConfig()
    assert _cps(cfg, 8, base, None) == {1}
    assert _cps(cfg, 8, base, 8192) == {1, 2, 4, 8}
    assert _cps(cfg, 8, base, 8200) == {1, 2, 4}  # 8200 = 8 x 1025: no 16 chunks
    assert _cps(cfg, 8, base, 8196) == {1, 2}
    # heads mode: 16 Mamba heads (head_dim 256) must divide by tp x cp; sequence mode: no cap
    narrow = wide_model(mamba={"head_dim": 256, "num_groups": 8})
    heads = list(candidate_layouts(narrow, 32, ParallelConfig(mamba_cp="heads"), 65536))
    assert heads and all(16 % (p.tp * p.cp) == 0 for p in heads)
    assert (1, 16) in {(p.tp, p.cp) for p in heads}
    sequence = list(candidate_layouts(narrow, 32, ParallelConfig(mamba_cp="sequence"), 65536))
    assert (1, 32) in {(p.tp, p.cp) for p in sequence}
    # a2a: 8 KV groups over tp x cp
    a2a = list(candidate_layouts(cfg, 16, ParallelConfig(cp_comm="a2a"), 8192))
    assert a2a and all(8 % (p.tp * p.cp) == 0 for p in a2a)
    assert any(p.tp * p.cp == 8 for p in a2a) and not any(p.tp * p.cp == 16 for p in a2a)
    # a sliding window with the p2p ring: no cp; with all_gather: cp
    window = {"num_heads": 32, "num_query_groups": 8, "sliding_window": 1024}
    swa = wide_model(layout="MAMA", attention=window)
    assert _cps(swa, 4, ParallelConfig(), 8192) == {1}
    assert _cps(swa, 4, ParallelConfig(cp_comm="all_gather"), 8192) == {1, 2, 4}


def test_plan_of_a_cp_recipe_lists_its_own_layout_and_prices_it():
    """inter_1b_64k (cp 4, full recompute) on 16 GPUs: the table has cp layouts, the recipe's
    own configuration is marked, and the whole model on one GPU at 64K needs recompute."""
    recipe = load_recipe(REPO / "recipes" / "inter_1b_64k.yaml")
    target = target_for(recipe, 16)
    plan = plan_layouts(recipe, target)
    assert {p.parallel.cp for p in plan} >= {1, 2, 4, 8}
    own = [p for p in plan if p.recipe]
    assert len(own) == 1 and own[0].parallel.cp == 4 and own[0].shape.recompute == "full"
    assert own[0].shape.microbatches == 32 // (16 // 4)
    memory = own[0].peak.parts
    assert memory["cp_buffers"] > 0
    whole = [p for p in plan if (p.parallel.tp, p.parallel.cp, p.parallel.pp) == (1, 1, 1)]
    assert len(whole) == 1 and whole[0].fits and whole[0].shape.recompute != "none"
    # the searched cp 4 layout is no slower than the recipe's own (it may pick its configuration)
    searched = [p for p in plan if p.name() == own[0].name() and not p.recipe]
    assert all(p.time.tokens_per_s >= own[0].time.tokens_per_s for p in searched)


# ---- FP8 ------------------------------------------------------------------------------------


def test_fp8_gemms_run_at_the_fitted_fp8_rate():
    """Under model.fp8 every GEMM term of a block takes gemm / gemm_fp8 of its bf16 time; the
    attention core, the SSD scan and the router do not change; the LM head only with
    fp8_output_layer."""
    from hybrid_megatron.accounting.step_time import head_seconds

    costs = load_costs("h100")
    ratio = costs.tflops["gemm"] / costs.tflops["gemm_fp8"]
    assert 0.5 < ratio < 1.0  # FP8 is faster
    moe = {"num_experts": 8, "top_k": 2, "expert_ffn_hidden_size": 4096}
    bf16 = wide_model(layout="MAMMAM", moe=moe)
    fp8 = wide_model(layout="MAMMAM", moe=moe, fp8="hybrid")
    shape = TrainingShape(seq_len=8192, micro_batch=2)
    for letter in "AM":
        a = block_term_seconds(bf16, letter, shape, RankLayout(), costs)
        b = block_term_seconds(fp8, letter, shape, RankLayout(), costs)
        for name in a:
            gemm = name in ("qkv_proj", "out_proj", "in_proj", "ffn", "moe_experts", "moe_shared")
            assert b[name] == pytest.approx(a[name] * (ratio if gemm else 1.0), rel=1e-12), name
    head = head_seconds(fp8, RankLayout(), shape, costs)
    assert head == pytest.approx(head_seconds(bf16, RankLayout(), shape, costs))
    fp8_head = wide_model(layout="MAMMAM", moe=moe, fp8="hybrid", fp8_output_layer=True)
    assert head_seconds(fp8_head, RankLayout(), shape, costs) == pytest.approx(head * ratio)


def test_fp8_memory_weight_copies_and_fp8_saved_inputs():
    """TE keeps 2 bytes per GEMM weight (not the router, norms, conv or embeddings; experts
    too, grouped or te_grouped), and saves GEMM-only inputs in one byte: an M block (with FFN)
    keeps 2h + d_inner + ffn fewer bytes per token."""
    h, f = 2048, 8192
    bf16, fp8 = wide_model(layout="MAMMAM"), wide_model(layout="MAMMAM", fp8="hybrid")
    a, m = attention_dims(fp8, "A"), mamba_dims(fp8, "M")
    assert a is not None and m is not None
    gemm_params = (
        2 * (h * a.qkv_width + a.width * h)  # two A blocks
        + 4 * (h * m.in_proj_width + m.d_inner * h)  # four M blocks
        + 6 * 3 * h * f  # six SwiGLU FFNs
    )
    shape = TrainingShape(seq_len=8192, micro_batch=1)
    pattern = build_layer_pattern(fp8)
    parts = stage_memory(fp8, pattern, 0, RankLayout(), shape).parts
    assert parts["fp8_weights"] == pytest.approx(2 * gemm_params)
    assert "fp8_weights" not in stage_memory(bf16, pattern, 0, RankLayout(), shape).parts
    kept_bf16 = block_activation_bytes(bf16, "M", shape, RankLayout())[0]
    kept_fp8 = block_activation_bytes(fp8, "M", shape, RankLayout())[0]
    assert kept_bf16 - kept_fp8 == pytest.approx((2 * h + m.d_inner + f) * 8192)
    # the attention output gains an FP8 copy next to flash attention's bf16 one
    kept_a = block_activation_bytes(bf16, "A", shape, RankLayout())[0]
    assert kept_a - block_activation_bytes(fp8, "A", shape, RankLayout())[0] == pytest.approx(
        (2 * h + f - a.width) * 8192
    )
    moe = {"num_experts": 8, "top_k": 2, "expert_ffn_hidden_size": 4096}
    experts = 6 * 8 * 3 * h * 4096  # every block's MoE FFN: 8 SwiGLU experts of 4096
    dense_moe = 2 * (2 * (h * a.qkv_width + a.width * h) + 4 * (h * m.in_proj_width + m.d_inner * h))
    for kind in ("grouped", "te_grouped"):
        with_experts = wide_model(layout="MAMMAM", fp8="hybrid", moe={**moe, "experts": kind})
        parts = stage_memory(with_experts, pattern, 0, RankLayout(), shape).parts
        assert parts["fp8_weights"] == pytest.approx(dense_moe + 2 * experts), kind


# ---- micro-batch and recompute search -------------------------------------------------------


def _brute_force_shapes(recipe, parallel, target):
    from hybrid_megatron.accounting.layout_plan import LayoutError, predict_layout

    out = []
    for recompute in ("none", "selective", "full"):
        for mbs in (1, 2, 4, 8, 16, 32, 64):
            try:
                out.append(predict_layout(recipe, parallel, target, mbs, recompute))
            except LayoutError:
                pass
    return out


@pytest.mark.parametrize("memory_gib", [80.0, 40.0, 24.0])
def test_search_picks_the_fastest_fitting_micro_batch_and_recompute(memory_gib):
    """inter_350m on one GPU (host-bound: larger micro-batches are faster): the search returns
    the fastest fitting (micro-batch, recompute) of every power of two the batch allows, which
    is the largest micro-batch that fits; a smaller GPU makes it recompute or shrink."""
    from hybrid_megatron.accounting.layout_plan import Target, best_training_shape

    recipe = load_recipe(REPO / "recipes" / "inter_350m.yaml", ["train.global_batch_size=32"])
    target = Target(1, memory_gib, load_costs("h100"))
    best = best_training_shape(recipe, ParallelConfig(), target)
    every = _brute_force_shapes(recipe, ParallelConfig(), target)
    fitting = [p for p in every if p.fits]
    assert best.fits and best.time.tokens_per_s == max(p.time.tokens_per_s for p in fitting)
    same_mode = [p for p in fitting if p.shape.recompute == best.shape.recompute]
    assert best.shape.micro_batch == max(p.shape.micro_batch for p in same_mode)
    assert best.shape.microbatches * best.shape.micro_batch == 32
    if memory_gib == 80.0:
        assert best.shape.recompute == "none" and best.shape.micro_batch >= 4


def test_plan_marks_the_recipes_own_configuration(capsys):
    """--plan prints each layout's searched micro-batch and recompute, and the recipe's own
    (layout, micro-batch, recompute) as one marked row."""
    from hybrid_megatron.launch.cli import main

    path = str(REPO / "recipes" / "inter_350m.yaml")
    assert main([path, "--plan", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("tp")]
    marked = [line for line in rows if line.endswith("<- recipe")]
    assert len(marked) == 1
    recipe = load_recipe(path)
    fields = marked[0].split()
    assert fields[:4] == [f"tp{recipe.parallel.tp}", "cp1", f"pp{recipe.parallel.pp}", "ep1"]
    assert fields[5:7] == [str(recipe.train.micro_batch_size), recipe.train.recompute]
    assert "mbs" in out and "recomp" in out


# ---- calibration of new bench rows ----------------------------------------------------------


def test_calibration_reads_recompute_and_sequence_length_rows(tmp_path):
    """A bench record with a selective-recompute row at 16K and a row without the key (none, 8K)
    in a results folder: ``table --results`` predicts each under its own recompute and length,
    reports the errors against the measured numbers and keeps the first out of the fit."""
    from bench.planner_calibration import main as calibrate
    from bench.train_throughput import RunOptions, model_config

    run = tmp_path / "results" / "train_throughput_h100_2099-01-01"
    run.mkdir(parents=True)
    common = {"scale": "1b", "kind": "inter", "arch": "inter", "ffn": "dense", "precision": "bf16"}
    rows = [
        {
            **common,
            "micro_batch": 1,
            "seq_length": 16384,
            "recompute": "selective",
            "tokens_per_s": 40000.0,
            "peak_memory_gib": 50.0,
            "step_s": 0.8192,
        },
        {
            **common,
            "micro_batch": 2,
            "seq_length": 8192,
            "tokens_per_s": 60000.0,
            "peak_memory_gib": 48.0,
            "step_s": 0.5461,
        },
    ]
    record = {"device": "NVIDIA H100 80GB HBM3", "options": {"microbatches": 2}, "rows": rows}
    (run / "run1_synthetic.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    assert calibrate(["table", "--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    table = json.loads((out / "calibration.json").read_text())
    assert [r["source"] for r in table["rows"]] == [
        "train_throughput_h100_2099-01-01/run1_synthetic.json"
    ] * 2
    cfg = model_config("1b", "inter", False, "bf16", RunOptions())
    pattern = build_layer_pattern(cfg)
    costs = load_costs("h100")
    for row, reported, recompute in zip(rows, table["rows"], ("selective", "none"), strict=True):
        shape = TrainingShape(row["seq_length"], row["micro_batch"], 2, recompute=recompute)
        memory = stage_memory(cfg, pattern, 0, RankLayout(), shape).total / GIB
        speed = predict_step(cfg, [pattern], RankLayout(), shape, costs).tokens_per_s
        assert reported["predicted_memory_gib"] == pytest.approx(memory, rel=1e-12)
        assert reported["predicted_tokens_per_s"] == pytest.approx(speed, rel=1e-12)
        assert reported["memory_error"] == pytest.approx(memory / row["peak_memory_gib"] - 1)
        assert reported["time_error"] == pytest.approx(speed / row["tokens_per_s"] - 1)
        assert reported["memory_meets"] == (abs(memory / row["peak_memory_gib"] - 1) <= 0.10)
    first, second = table["rows"]
    assert "recompute=selective" in first["config"] and "seq=16384" in first["config"]
    assert "recompute" not in second["config"] and "seq=" not in second["config"]
    assert not first["fitted"] and second["fitted"]
    # selective recompute drops the attention core's Q, K, V: less than none needs at 16K
    none_16k = stage_memory(cfg, pattern, 0, RankLayout(), TrainingShape(16384, 1, 2)).total / GIB
    assert first["predicted_memory_gib"] < none_16k
    readme = (out / "README.md").read_text()
    assert "of 2** rows" in readme and "recompute=selective" in readme
