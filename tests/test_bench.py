"""bench/train_throughput.py: the harness runs on CPU (tiny rows), maps our block patterns onto
megatron-core's hybrid pattern, and its report forms ratios and goals within one run only."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from bench import train_throughput as bench
from tests.training_helpers import REPO


def test_native_pattern_maps_each_block_to_mixer_plus_ffn_layer():
    assert bench.native_pattern("MMAM", moe=False) == "M-M-*-M-"
    assert bench.native_pattern("MA", moe=True) == "ME*E"


def _row(kind, tps, precision="bf16", scale="1b", ffn="dense"):
    return {
        "scale": scale,
        "kind": kind,
        "ffn": ffn,
        "precision": precision,
        "tokens_per_s": tps,
        "flops_per_token": 1e10,
        "num_parameters": 1,
        "peak_memory_gib": 1.0,
    }


def test_report_ratios_and_goals_stay_within_one_run():
    run_a = {
        "device": "H100",
        "date": "d",
        "rows": [
            _row("inter", 40_000),
            _row("native_mamba_hybrid", 40_000),
            _row("intra", 30_000),
            _row("inter", 52_000, "fp8"),
        ],
    }
    # A second run's native row must not become run_a's baseline.
    run_b = {"device": "H100", "date": "d", "rows": [_row("native_mamba_hybrid", 10_000)]}
    summary = bench.summarise([run_a, run_b])
    inter = next(r for r in summary["rows"] if r["kind"] == "inter" and r["precision"] == "bf16")
    assert inter["vs_baseline"] == pytest.approx(1.0)
    assert inter["mfu"] == pytest.approx(1e10 * 40_000 / 989e12)
    goals = {g["goal"]: g for g in summary["goals"]}
    assert goals["1b dense bf16: intra >= 0.95x inter"]["value"] == pytest.approx(0.75)
    assert goals["1b dense bf16: intra >= 0.95x inter"]["met"] is False
    assert goals["1b dense bf16: inter >= 1.00x native MambaModel"]["met"] is True
    assert goals["1b dense inter: fp8 >= 1.25x bf16"]["value"] == pytest.approx(1.3)
    assert all(g["run"] == 0 for g in summary["goals"])
    assert "| 0 | 1b | intra | dense | bf16 |" in bench.markdown(summary)


def test_report_prints_a_ratio_just_under_its_goal_as_missed():
    """0.997x must not print as "1.00x" next to "NO"."""
    run = {
        "device": "H100",
        "date": "d",
        "rows": [_row("inter", 39_880), _row("native_mamba_hybrid", 40_000)],
    }
    text = bench.markdown(bench.summarise([run]))
    assert "| 0 | 1b dense bf16: inter >= 1.00x native MambaModel | 0.997x | NO |" in text


def test_report_reads_records_whose_rows_say_arch():
    """The committed records in bench/results name the kind column ``arch``; max-mbs records
    (rows with a kind but no precision) are not throughput rows."""
    old = {
        "device": "H100",
        "date": "d",
        "rows": [
            {**{k: v for k, v in _row(kind, tps).items() if k != "kind"}, "arch": kind}
            for kind, tps in (("inter", 30_000), ("native_mamba_hybrid", 40_000))
        ],
    }
    max_mbs = {
        "device": "H100",
        "date": "d",
        "rows": [{"kind": "inter", "recompute": "none", "attempts": []}],
    }
    summary = bench.summarise([old, max_mbs])
    assert [(r["kind"], "arch" in r) for r in summary["rows"]] == [
        ("inter", False),
        ("native_mamba_hybrid", False),
    ]
    assert summary["rows"][0]["vs_baseline"] == pytest.approx(0.75)
    assert "| 0 | 1b | inter | dense | bf16 |" in bench.markdown(summary)


def test_committed_records_still_report():
    records = [
        json.loads(p.read_text())
        for p in sorted((REPO / "bench" / "results").glob("train_throughput_*/run*.json"))
    ]
    summary = bench.summarise(records)
    assert len(summary["rows"]) == sum(len(r["rows"]) for r in records) > 0
    assert all(r["kind"] in bench.KINDS + list(bench.NATIVES) for r in summary["rows"])
    assert bench.markdown(summary).count("\n| ") > len(summary["rows"])  # one line per row, plus goals


def test_tiny_rows_train_on_cpu(tmp_path):
    out = tmp_path / "tiny.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "train_throughput.py"),
            "run",
            "--scales",
            "tiny",
            "--kinds",
            "inter",
            "intra",
            "--ffn",
            "dense",
            "moe",
            "--precisions",
            "bf16",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--out",
            str(out),
            "--mbs",
            "1",
            "--microbatches",
            "2",
            "--overlap-branches",
            "--intra-dim-ratio",
            "1:3",
            "--attention-head-dim",
            "32",
            "--unfused",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["options"]["microbatches"] == 2 and record["options"]["overlap_branches"]
    assert record["options"]["intra_dim_ratio"] == "1:3"
    assert record["options"]["attention_head_dim"] == 32 and record["options"]["unfused"] is True
    rows = record["rows"]
    assert [(r["kind"], r["ffn"]) for r in rows] == [
        ("inter", "dense"),
        ("intra", "dense"),
        ("inter", "moe"),
        ("intra", "moe"),
    ]
    for r in rows:
        assert "error" not in r, r.get("traceback")
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 3
        # a step is 2 micro-batches of 1 sample: tokens/s counts both
        assert (r["micro_batch"], r["microbatches"]) == (1, 2)
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(2 * 1 * r["seq_length"])
        assert all(math.isfinite(loss) for loss in r["losses"])


def test_run_options_round_trip_through_their_flags():
    import argparse

    options = bench.RunOptions(
        micro_batch=2,
        microbatches=4,
        cuda_graphs=True,
        intra_dim_ratio="1:3",
        intra_pattern="1:3",
        fp8_output_layer=True,
        attention_head_dim=128,
        unfused=True,
        unfused_moe=True,
        recompute="full",
        seq_length=16384,
        max_memory_gib=40.5,
    )
    parser = argparse.ArgumentParser()
    bench.add_option_flags(parser)
    assert bench.RunOptions.from_args(parser.parse_args(options.as_args())) == options
    assert bench.RunOptions.from_args(parser.parse_args([])) == bench.RunOptions()


@pytest.mark.parametrize("kind", ["transformer", "inter", "intra"])
def test_attention_head_dim_keeps_parameters_and_flops(kind):
    """--attention-head-dim 128 at 1b: 16 heads of 128 (4 KV groups) instead of 32 of 64 (8),
    the same widths, so the same parameters and FLOPs; a size that does not divide is refused."""
    from hybrid_megatron.accounting import count_parameters
    from hybrid_megatron.accounting.flops import model_flops_per_token

    base = bench.model_config("1b", kind, False, "bf16")
    wide = bench.model_config("1b", kind, False, "bf16", bench.RunOptions(attention_head_dim=128))
    assert (base.head_dim, wide.head_dim) == (64, 128)
    assert (wide.attention.num_heads, wide.query_groups) == (16, 4)
    if kind == "intra":
        assert wide.intra.num_query_groups == 4
    assert count_parameters(wide).total == count_parameters(base).total
    assert model_flops_per_token(wide, 8192) == model_flops_per_token(base, 8192)
    with pytest.raises(ValueError, match="--attention-head-dim 96"):
        bench.model_config("1b", kind, False, "bf16", bench.RunOptions(attention_head_dim=96))


def test_fp8_head_and_intra_pattern_reach_only_their_rows():
    """--fp8-output-layer sets model.fp8_output_layer on fp8 rows only; --intra-pattern sets
    the share of hybrid blocks on intra rows only (1:3 at 1b: fewer attention FLOPs than the
    all-hybrid recipe, but more than inter)."""
    from hybrid_megatron.accounting.flops import model_flops_per_token
    from hybrid_megatron.config.layer_pattern import build_layer_pattern

    options = bench.RunOptions(fp8_output_layer=True, intra_pattern="1:3")
    assert bench.model_config("1b", "inter", False, "fp8", options).fp8_output_layer
    assert not bench.model_config("1b", "inter", False, "bf16", options).fp8_output_layer
    intra = bench.model_config("1b", "intra", False, "bf16", options)
    assert build_layer_pattern(intra) == "MMMHMMMHMMMMH"  # 3 hybrid blocks of 13, spread
    assert bench.model_config("1b", "inter", False, "bf16", options).pattern.ratio == "1:5"
    flops = {
        name: model_flops_per_token(cfg, 8192)
        for name, cfg in {
            "all": bench.model_config("1b", "intra", False, "bf16"),
            "1:3": intra,
            "inter": bench.model_config("1b", "inter", False, "bf16"),
        }.items()
    }
    assert flops["all"] > flops["1:3"] > flops["inter"]


@pytest.mark.parametrize(
    "capacity,limit,largest", [(5, 32, 5), (1, 32, 1), (12, 32, 12), (0, 32, 0), (100, 16, 16), (8, 32, 8)]
)
def test_largest_fitting_doubles_then_bisects(capacity, limit, largest):
    """max-mbs's search finds the exact largest size up to the limit, never tries a size above
    the first failure, and tries no size twice."""
    import torch

    def try_size(mbs):
        if mbs > capacity:
            raise torch.OutOfMemoryError(f"{mbs} > {capacity}")
        return float(mbs)

    attempts = bench.largest_fitting(try_size, limit)
    sizes = [a["micro_batch"] for a in attempts]
    assert max((a["micro_batch"] for a in attempts if a["fits"]), default=0) == largest
    assert len(sizes) == len(set(sizes))
    assert all(a["fits"] == (a["micro_batch"] <= capacity) for a in attempts)
    failed = [a["micro_batch"] for a in attempts if not a["fits"]]
    assert not failed or min(failed) == largest + 1 or largest == limit
    assert len(attempts) <= 2 * limit.bit_length()  # doubling plus bisection, not a linear scan


def test_busy_time_is_the_union_of_kernel_intervals():
    """Kernels overlapping on two streams count once; gaps count not at all."""
    assert bench.busy_time([]) == 0
    assert bench.busy_time([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert bench.busy_time([(20, 25), (0, 10), (10, 11)]) == 16


def test_gc_pauses_counts_collections_inside_only():
    import gc

    class Node:
        pass

    def cycles(n):
        for _ in range(n):
            a, b = Node(), Node()
            a.other, b.other = b, a

    with bench.GcPauses() as pauses:
        cycles(10)
        gc.collect()
        gc.collect(0)
    assert pauses.count == 2 and pauses.seconds > 0
    gc.collect()
    assert pauses.count == 2  # the callback is gone after the block


def test_profile_groups_ops_by_their_call_stacks_on_cpu(tmp_path):
    out = tmp_path / "profile.txt"
    done = subprocess.run(
        [sys.executable, "-m", "bench.train_throughput", "profile", "--scale", "tiny", "--kind", "inter"]
        + ["--moe", "--steps", "1", "--rows", "200", "--stacks", "3", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    section = out.read_text().split(
        "By call stack (3 Python frames, innermost first), host time per step:\n"
    )[1]
    rows = section.split("\n\nHost waits on the GPU")[0].splitlines()
    times = [float(row.split()[0]) for row in rows]
    assert len(rows) > 10 and times == sorted(times, reverse=True)
    # the expert GEMMs are traced to the grouped experts' code, three frames at most
    expert_rows = [row for row in rows if "hybrid_megatron/models/moe.py" in row and "aten::mm" in row]
    assert expert_rows and all(row.count(" < ") <= 2 for row in rows)


def test_max_mbs_searches_after_a_warm_step(tmp_path, monkeypatch):
    """Each kind's search starts after one step at micro-batch 1, so every recorded size's peak
    has Adam's moments; the record says so (``warm_step``), and the calibration then keeps every
    fitting size, where it drops the first size of records without it."""
    from bench import planner_calibration

    steps: list[int] = []

    def fake_step(trainee, vocab, seq, mbs):
        steps.append(mbs)
        if mbs > 2:
            raise bench.torch.OutOfMemoryError("fake")
        return 10.0 + mbs

    monkeypatch.setattr(bench, "_step_peak_memory", fake_step)
    # no model and no process-group reset: this process's parallel state belongs to other tests
    monkeypatch.setattr(bench, "Trainee", lambda kind, cfg, recompute: None)
    monkeypatch.setattr(bench, "_reset_run_state", lambda: None)
    out = tmp_path / "train_throughput_h100_2099-01-01" / "max_mbs_tiny.json"
    out.parent.mkdir()
    args = ["--scale", "tiny", "--kinds", "inter", "--recompute", "full", "--max", "8", "--out", str(out)]
    bench.main(["max-mbs", *args])
    assert steps == [1, 1, 2, 4, 3]  # the warm step, then doubling and bisection
    record = json.loads(out.read_text())
    assert record["warm_step"] is True
    assert [a["micro_batch"] for a in record["rows"][0]["attempts"] if a["fits"]] == [1, 2]
    rows = planner_calibration.max_microbatch_rows(tmp_path)
    assert [r["row"]["micro_batch"] for r in rows] == [1, 2]
    del record["warm_step"]
    out.write_text(json.dumps(record))
    assert [r["row"]["micro_batch"] for r in planner_calibration.max_microbatch_rows(tmp_path)] == [2]


MOE_ROW_FREES_ITS_MODEL = """
import gc, json, sys, weakref
import bench.train_throughput as bench
from hybrid_megatron import runtime

runtime.setup()
bench._init_process_group()
alive = {}
original = bench.Trainee.for_options.__func__


def recording(cls, kind, cfg, options):
    trainee = original(cls, kind, cfg, options)
    made.append(weakref.ref(trainee.trainable.model_chunks[0]))
    return trainee


bench.Trainee.for_options = classmethod(recording)
own_release = bench.Trainee.release
for release in ("kept", "dropped"):
    bench.Trainee.release = (lambda self: None) if release == "kept" else own_release
    made = []
    row = bench.measure_row("tiny", "inter", True, "bf16", 1, 1, bench.RunOptions(microbatches=2))
    assert "error" not in row, row.get("traceback")
    gc.collect()
    alive[release] = made[0]() is not None
print(json.dumps(alive))
"""


def test_an_moe_row_frees_its_model_when_it_ends():
    """An in-process MoE row's model is collected once the row ends: the routing tensors its
    dispatcher kept from the last forward (with their autograd graph) are dropped. Without that
    the model stays alive, which is what made the next row's peak about 13 GiB higher at 350M."""
    done = subprocess.run(
        [sys.executable, "-c", MOE_ROW_FREES_ITS_MODEL],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"kept": True, "dropped": False}
