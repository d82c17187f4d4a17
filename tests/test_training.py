"""Trainer reliability: exact resume after kill -9, resharded resume, atomic saves, NaN
handling and up-front errors for bad input."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.training_helpers import REPO, read_losses, start_job, wait_job

RECIPE = str(REPO / "recipes" / "tiny_intra.yaml")


def _overrides(run_dir: Path, *extra: str) -> list[str]:
    return [
        f"checkpoint.dir={run_dir}/checkpoints",
        "train.steps=12", "train.warmup_steps=2", "train.log_interval=1",
        "train.eval_interval=0", "checkpoint.interval=4", "checkpoint.keep_last=5",
        "train.deterministic=true", "tracking.enabled=false", "model.num_layers=2",
        *extra,
    ]


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted_run_bitwise(tmp_path):
    """TP=2 on two gloo ranks: SIGKILL at a random step after a checkpoint, resume, compare."""
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    par = ["parallel.tp=2"]
    assert wait_job(start_job(RECIPE, _overrides(ref_dir, *par), 2, ref_dir / "logs")) == [0, 0]
    reference = read_losses(ref_dir)
    assert sorted(reference) == list(range(1, 13))

    kill_after = random.Random().randint(5, 7)  # checkpoint at 4; killed before the one at 8
    procs = start_job(RECIPE, _overrides(cut_dir, *par), 2, cut_dir / "logs")
    deadline = time.time() + 300
    while max(read_losses(cut_dir), default=0) < kill_after:
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    wait_job(procs)
    assert (cut_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert max(read_losses(cut_dir)) < 12

    assert wait_job(start_job(RECIPE, _overrides(cut_dir, *par), 2, cut_dir / "logs")) == [0, 0]
    resumed = read_losses(cut_dir)
    assert "resumed from" in (cut_dir / "logs" / "rank0.log").read_text()
    for step in range(5, 13):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])


@pytest.mark.slow
def test_checkpoint_from_tp2_resumes_at_pp2(tmp_path):
    """Saved at TP=2,PP=1; loaded at TP=1,PP=2 (weights and optimizer states resharded):
    the next steps' losses match the TP=2 run continuing (fp32, different reduction order)."""
    tp_dir, pp_dir = tmp_path / "tp", tmp_path / "pp"
    assert wait_job(start_job(RECIPE, _overrides(tp_dir, "parallel.tp=2"), 2, tp_dir / "logs")) == [0, 0]
    reference = read_losses(tp_dir)
    shutil.copytree(tp_dir / "checkpoints" / "step_00000008", pp_dir / "ckpt" / "step_00000008")
    resume = [f"checkpoint.resume={pp_dir}/ckpt/step_00000008", "parallel.pp=2"]
    assert wait_job(start_job(RECIPE, _overrides(pp_dir, *resume), 2, pp_dir / "logs")) == [0, 0]
    resumed = read_losses(pp_dir)
    assert sorted(resumed) == [9, 10, 11, 12]
    for step in resumed:
        a, b = float.fromhex(resumed[step]), float.fromhex(reference[step])
        assert abs(a - b) < 1e-4, (step, a, b)


# ---- in-process tests (one gloo rank) -------------------------------------------------------


def _recipe(tmp_path, *extra):
    from hybrid_megatron.config import load_recipe

    return load_recipe(RECIPE, _overrides(tmp_path, *extra))


def test_crash_during_save_keeps_latest_valid(single_rank, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from hybrid_megatron.training import checkpoint as ckpt
    from hybrid_megatron.training.entry import train

    real_save = dist_checkpointing.save
    calls = {"n": 0}

    def crashing_save(state, directory, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save dies half-way: some files written, then a crash
            (Path(directory) / "half_written.distcp").write_bytes(b"\0" * 100)
            raise OSError("disk full (simulated)")
        return real_save(state, directory, *args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        train(_recipe(tmp_path, "train.steps=8"))
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert ckpt.latest_checkpoint(str(root)).name == "step_00000004"
    assert list(root.glob("step_00000008*partial*"))  # the broken one never got the final name
    assert not (root / "step_00000008").exists()

    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    summary = train(_recipe(tmp_path, "train.steps=8"))  # resumes from step 4, cleans up
    assert summary["steps"] == 8 and Path(summary["last_checkpoint"]).name == "step_00000008"
    assert not list(root.glob("*partial*"))


def test_nan_steps_are_skipped_then_abort(single_rank, tmp_path, monkeypatch):
    from hybrid_megatron.training import entry, step

    real = step.run_schedule
    bad_calls = {3, 6, 7, 8}  # schedule calls (= steps here) returning a non-finite loss
    seen = {"n": 0}

    def flaky(model_chunks, micro, seq, forward_only):
        loss = real(model_chunks, micro, seq, forward_only)
        seen["n"] += 1
        return float("nan") if seen["n"] in bad_calls else loss

    monkeypatch.setattr(step, "run_schedule", flaky)
    with pytest.raises(entry.TrainingAborted, match=r"step 8: 3 non-finite losses in a row"):
        train = entry.train
        train(_recipe(tmp_path, "train.max_consecutive_nan_skips=3", "checkpoint.interval=100"))


def test_nan_step_leaves_weights_untouched(single_rank, tmp_path, monkeypatch):
    import torch

    from hybrid_megatron.training import step

    real = step.run_schedule
    snapshots = []

    def nan_on_third(model_chunks, micro, seq, forward_only):
        loss = real(model_chunks, micro, seq, forward_only)
        snapshots.append([p.detach().clone() for p in model_chunks[0].parameters()])
        return float("nan") if len(snapshots) == 3 else loss

    monkeypatch.setattr(step, "run_schedule", nan_on_third)
    from hybrid_megatron.training.entry import train

    summary = train(_recipe(tmp_path, "train.steps=4", "checkpoint.interval=100"))
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    # step 2's update (warmup lr > 0) moved the weights; step 3's NaN update was dropped
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    for a, b in zip(snapshots[2], snapshots[3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("problem", ["missing_prefix", "corrupt_idx", "vocab_mismatch", "unwritable_dir"])
def test_bad_input_fails_before_training(single_rank, tmp_path, problem):
    from hybrid_megatron.training.entry import train

    data = REPO / "data"
    extra = []
    expected = ""
    if problem == "missing_prefix":
        extra = [f"data.blend={tmp_path}/nope_text_document"]
        expected = "nope_text_document"
    elif problem == "corrupt_idx":
        for suffix in (".bin", ".idx"):
            shutil.copy(data / f"austen_4k_text_document{suffix}", tmp_path / f"bad{suffix}")
        with open(tmp_path / "bad.idx", "r+b") as f:
            f.write(b"GARBAGE!")
        extra = [f"data.blend={tmp_path}/bad"]
        expected = "bad.idx"
    elif problem == "vocab_mismatch":
        extra = ["model.vocab_size=1000"]
        expected = "vocab"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        extra = [f"checkpoint.dir={locked}/sub/checkpoints"]
        expected = "checkpoint.dir"
        if os.geteuid() == 0:
            # root ignores directory permissions; a regular file in the path is unwritable for all
            (tmp_path / "afile").write_text("x")
            extra = [f"checkpoint.dir={tmp_path}/afile/checkpoints"]
    recipe = _recipe(tmp_path, *extra)
    with pytest.raises(Exception, match=expected) as err:
        train(recipe)
    assert "Traceback" not in str(err.value)
    assert not (Path(recipe.run_dir) / "train_log.jsonl").exists()  # no step ran


def test_bf16_training_runs_and_learns(single_rank, tmp_path):
    """bf16 parameters (Float16Module) with fp32 master weights in the distributed optimizer."""
    import math

    from hybrid_megatron.training.entry import train

    summary = train(_recipe(tmp_path, "train.precision=bf16", "train.steps=6", "checkpoint.interval=6"))
    losses = {k: float.fromhex(v) for k, v in read_losses(tmp_path).items()}
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[6] < losses[1] - 0.1, losses
