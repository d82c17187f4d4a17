"""bench/scale_out.py (issue #9's scale-out check): its loss comparison fails when it should,
bad input is one line, and end to end on CPU the intra MoE hybrid at TP=2 x PP=2 (+SP, 4 gloo
ranks) matches one rank, and a checkpoint saved at TP=2 x PP=2 resumes at one rank."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.training_helpers import REPO

_spec = importlib.util.spec_from_file_location("scale_out", REPO / "bench" / "scale_out.py")
scale_out = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale_out)

SCRIPT = str(REPO / "bench" / "scale_out.py")
RECIPE = "recipes/tiny_intra_moe.yaml"
LAYOUT_A = ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"]
LAYOUT_B = ["parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false"]


def test_loss_comparison_fails_on_a_perturbed_run():
    ref = {s: 8.0 - 0.1 * s for s in range(1, 9)}
    assert scale_out.compare_losses(ref, dict(ref), range(1, 9), 1e-5)["passed"]
    perturbed = {**ref, 6: ref[6] * (1 + 1e-3)}
    check = scale_out.compare_losses(ref, perturbed, range(1, 9), 1e-5)
    assert not check["passed"] and check["worst_step"] == 6
    assert check["max_rel_diff"] == pytest.approx(1e-3)
    # A resume that started over (logs steps 1..8, not 5..8) fails even with equal losses.
    assert not scale_out.compare_losses(ref, ref, range(5, 9), 1e-5)["passed"]
    assert not scale_out.compare_losses(ref, {**ref, 3: math.nan}, range(1, 9), 1.0)["passed"]


def test_throughput_is_read_from_the_trainer_records():
    records = {s: {"step": s, "loss": 7.0, "tokens_per_s": t, "mfu": m}
               for s, t, m in [(1, 1_000, 0.01), (2, 2_000, 0.02), (3, 40_000, 0.40),
                               (4, 44_000, 0.44), (5, 42_000, 0.42)]}
    got = scale_out.read_throughput(records, nproc=4)  # steps 1-2 are warm-up, left out
    assert got == {"tokens_per_s_per_rank": 10_500.0, "mfu": pytest.approx(0.42), "steps_measured": 3}
    cpu = {s: {**r, "mfu": None} for s, r in records.items()}
    assert scale_out.read_throughput(cpu, nproc=1)["mfu"] is None


@pytest.mark.parametrize("args, message", [
    (["recipes/nope.yaml"], "recipes/nope.yaml: recipe file not found"),
    ([RECIPE, "--nproc-a", "6"], "--nproc 6: the world size must be a multiple of 4"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    done = subprocess.run(
        [sys.executable, SCRIPT, *args, "--layout-a", *LAYOUT_A, "--layout-b", *LAYOUT_B,
         "--output", str(tmp_path / "runs"), "--out", str(tmp_path / "r.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and f"error: {message}" in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran


@pytest.mark.slow  # ~90 s: four launcher runs (init, A on 4 ranks, B, resume) on 2 cores
def test_tp2_pp2_matches_one_rank_and_resumes_resharded(tmp_path):
    out = tmp_path / "record.json"
    done = subprocess.run(
        [sys.executable, SCRIPT, RECIPE, "--layout-a", *LAYOUT_A, "--layout-b", *LAYOUT_B,
         "--steps", "8", "--tolerance", "1e-4", "--output", str(tmp_path / "runs"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["passed"] and record["error"] is None
    assert [record["layouts"][k]["nproc"] for k in ("a", "b")] == [4, 1]  # the launcher's default
    losses = record["losses"]
    assert len(losses["a"]) == len(losses["b"]) == 8 and len(losses["resume"]) == 4
    assert all(math.isfinite(x) and x > 1.0 for x in losses["a"] + losses["b"] + losses["resume"])
    assert losses["a"][-1] < losses["a"][0]  # it trained
    for name, steps in (("A vs B", [1, 8]), ("resume at B vs A", [5, 8])):
        check = record["checks"][name]
        assert check["passed"] and check["steps"] == steps and check["max_rel_diff"] <= 1e-4, check
    # fp32 on CPU: the resumed run retraces A's steps 5..8 (not a run from scratch)
    assert losses["resume"] == pytest.approx(losses["a"][4:], rel=1e-4)
    for key in ("a", "b"):
        assert record["layouts"][key]["tokens_per_s_per_rank"] > 0
        assert record["layouts"][key]["mfu"] is None  # no MFU without a GPU peak
    assert "| A vs B | 1..8 |" in done.stdout
