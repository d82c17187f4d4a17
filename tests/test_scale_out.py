"""bench/scale_out.py, the scale-out check: its loss comparison fails when it should,
bad input is one line, and end to end on CPU the intra MoE hybrid at TP=2 x PP=2 (+SP, 4 gloo
ranks) matches one rank, and a checkpoint saved at TP=2 x PP=2 resumes at one rank."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench import scale_out
from tests.training_helpers import REPO

SCRIPT = str(REPO / "bench" / "scale_out.py")
RECIPE = "recipes/intra_tiny_moe.yaml"
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
    records = {
        s: {"step": s, "loss": 7.0, "tokens_per_s": t, "mfu": m}
        for s, t, m in [
            (1, 1_000, 0.01),
            (2, 2_000, 0.02),
            (3, 40_000, 0.40),
            (4, 44_000, 0.44),
            (5, 42_000, 0.42),
        ]
    }
    got = scale_out.read_throughput(records, nproc=4)  # steps 1-2 are warm-up, left out
    assert got == {"tokens_per_s_per_rank": 10_500.0, "mfu": pytest.approx(0.42), "steps_measured": 3}
    cpu = {s: {**r, "mfu": None} for s, r in records.items()}
    assert scale_out.read_throughput(cpu, nproc=1)["mfu"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["recipes/nope.yaml"], "recipes/nope.yaml: recipe file not found"),
        ([RECIPE, "--nproc-a", "6"], "--nproc 6: the world size must be a multiple of 4"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    done = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            *args,
            "--layout-a",
            *LAYOUT_A,
            "--layout-b",
            *LAYOUT_B,
            "--output",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "r.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and f"error: {message}" in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran


@pytest.mark.long  # ~100 s: four launcher runs (init, A on 4 ranks, B, resume) on 2 cores
def test_tp2_pp2_matches_one_rank_and_resumes_resharded(tmp_path):
    out = tmp_path / "record.json"
    done = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            RECIPE,
            "--layout-a",
            *LAYOUT_A,
            "--layout-b",
            *LAYOUT_B,
            "--steps",
            "8",
            "--tolerance",
            "1e-4",
            "--output",
            str(tmp_path / "runs"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
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


def test_run_names_and_their_steps():
    assert scale_out.a_names(1) == ["a"] and scale_out.a_names(3) == ["a1", "a2", "a3"]
    assert [scale_out.resume_name(n) for n in ("a", "a2")] == ["resume", "resume_a2"]
    assert scale_out.logged_steps("init", 8) == [1]
    assert scale_out.logged_steps("a2", 8) == scale_out.logged_steps("b", 8) == list(range(1, 9))
    assert scale_out.logged_steps("resume_a2", 9) == [5, 6, 7, 8, 9]


def test_speedup_is_whole_job_tokens_per_second():
    b = {"tokens_per_s_per_rank": 1000.0, "nproc": 1}
    assert scale_out.speedup({"tokens_per_s_per_rank": 800.0, "nproc": 2}, b) == pytest.approx(1.6)
    assert scale_out.speedup({"tokens_per_s_per_rank": None, "nproc": 2}, b) is None


def test_checkpoints_are_pruned_to_the_resume_step_and_moved(tmp_path):
    from hybrid_megatron.checkpoint_layout import step_dir_name

    a, resume = tmp_path / "a" / "checkpoints", tmp_path / "resume" / "checkpoints"
    for step in (4, 8):
        (a / step_dir_name(step)).mkdir(parents=True)
        (a / step_dir_name(step) / "shard").write_text(str(step))
    scale_out.keep_only_checkpoint(a, 4, 8)
    assert sorted(p.name for p in a.iterdir() if p.is_dir()) == [step_dir_name(4)]
    scale_out.move_checkpoint(a, 4, resume)
    assert (resume / step_dir_name(4) / "shard").read_text() == "4"
    assert not (a / step_dir_name(4)).exists()
    scale_out.move_checkpoint(a, 4, resume)  # a resume being continued: already there
    with pytest.raises(scale_out.BadInput, match="no checkpoint at step 4"):
        scale_out.move_checkpoint(a, 4, tmp_path / "other")


@pytest.mark.long  # ~2.5 min: init, B, two A layouts and their resumes, then B again
def test_several_layouts_share_one_reference_and_a_later_call_keeps_finished_runs(tmp_path):
    """The 350M MoE 2-GPU layouts on 2 gloo ranks: TP 2 x EP 2 with whole experts and EP 2 (DP 2),
    each against one rank, each resumed at one rank; then a run killed halfway (B's log lost)
    is the only one a --keep-finished call redoes."""
    out = tmp_path / "record.json"
    command = [
        sys.executable,
        SCRIPT,
        RECIPE,
        "--layout-a",
        "parallel.ep=2",
        "parallel.expert_tp=1",  # intra_tiny_moe: tp 2 + SP
        "--layout-a",
        "parallel.ep=2",
        "parallel.tp=1",
        "parallel.sequence_parallel=false",
        "--layout-b",
        "parallel.tp=1",
        "parallel.sequence_parallel=false",
        "--nproc-a",
        "2",
        "--steps",
        "4",
        "--tolerance",
        "1e-4",
        "--output",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["passed"] and record["complete"]
    assert {k: v["nproc"] for k, v in record["layouts"].items()} == {"b": 1, "a1": 2, "a2": 2}
    assert set(record["checks"]) == {"A1 vs B", "resume at B vs A1", "A2 vs B", "resume at B vs A2"}
    for check in record["checks"].values():
        assert check["passed"] and check["max_rel_diff"] <= 1e-4, check
    assert record["layouts"]["a1"]["speedup_vs_b"] > 0
    runs = tmp_path / "runs"
    # B and the resumes save nothing; each A's middle checkpoint was moved to its resume
    assert [p.parent.parent.name for p in runs.glob("*/checkpoints/step*")] == ["init"]
    assert not (runs / "a1" / "checkpoints" / "latest").exists()
    (runs / "b" / "train_log.jsonl").unlink()  # as if B had been killed
    again = subprocess.run(
        command + ["--keep-finished"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for name in ("init", "a1", "resume_a1", "a2", "resume_a2"):
        assert f"[{name}] kept: finished by an earlier call" in again.stdout
    assert "[b] kept" not in again.stdout
    rerun = json.loads(out.read_text())
    assert rerun["losses"]["b"] == pytest.approx(record["losses"]["b"], rel=1e-6)  # same init, data
    assert rerun["passed"]
