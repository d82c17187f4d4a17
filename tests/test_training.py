"""Trainer reliability: exact resume after kill -9, resharded resume, atomic saves, NaN
handling and up-front errors for bad input."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.training_helpers import REPO, kill_rank, read_losses, start_job, wait_job

RECIPE = str(REPO / "recipes" / "intra_tiny.yaml")


def _overrides(run_dir: Path, *extra: str) -> list[str]:
    return [
        f"checkpoint.dir={run_dir}/checkpoints",
        "train.steps=12",
        "train.warmup_steps=2",
        "train.log_interval=1",
        "train.eval_interval=0",
        "checkpoint.interval=4",
        "checkpoint.keep_last=5",
        "train.deterministic=true",
        "tracking.enabled=false",
        "model.num_layers=2",
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
        kill_rank(p)  # the rank and its helper processes, as SLURM ends a job step
    wait_job(procs)
    assert (cut_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert max(read_losses(cut_dir)) < 12

    assert wait_job(start_job(RECIPE, _overrides(cut_dir, *par), 2, cut_dir / "logs")) == [0, 0]
    resumed = read_losses(cut_dir)
    assert "resumed from" in (cut_dir / "logs" / "rank0.log").read_text()
    for step in range(5, 13):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])


def _assert_continues(reference: dict, resumed: dict) -> None:
    """A run resumed from step 8 logged steps 9-12, each within 1e-4 of the reference (fp32)."""
    assert sorted(resumed) == [9, 10, 11, 12]
    for step in resumed:
        a, b = float.fromhex(resumed[step]), float.fromhex(reference[step])
        assert abs(a - b) < 1e-4, (step, a, b)


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
    _assert_continues(reference, read_losses(pp_dir))


@pytest.mark.slow
def test_checkpoint_from_ep1_resumes_at_ep2(tmp_path):
    """MoE optimizer states across EP sizes: saved by one rank at EP 1 (one optimizer), loaded
    by two ranks at EP 2, where megatron-core chains a second optimizer for the experts; the
    next steps' losses match the EP 1 run continuing (fp32). The EP 2 -> 1 direction is
    tests/test_scale_out.py's resume check."""
    moe = str(REPO / "recipes" / "intra_tiny_moe.yaml")
    one, ep2 = ["parallel.tp=1", "parallel.sequence_parallel=false"], ["parallel.ep=2"]
    ref_dir, ep_dir = tmp_path / "ep1", tmp_path / "ep2"
    assert wait_job(start_job(moe, _overrides(ref_dir, *one), 1, ref_dir / "logs")) == [0]
    reference = read_losses(ref_dir)
    shutil.copytree(ref_dir / "checkpoints" / "step_00000008", ep_dir / "ckpt" / "step_00000008")
    resume = [f"checkpoint.resume={ep_dir}/ckpt/step_00000008", *one, *ep2]
    assert wait_job(start_job(moe, _overrides(ep_dir, *resume), 2, ep_dir / "logs")) == [0, 0]
    _assert_continues(reference, read_losses(ep_dir))


# ---- in-process tests (one gloo rank) -------------------------------------------------------


def _recipe(tmp_path, *extra):
    from hybrid_megatron.config import load_recipe

    return load_recipe(RECIPE, _overrides(tmp_path, *extra))


def test_crash_during_save_keeps_latest_valid(single_rank, tmp_path, monkeypatch, capsys):
    from megatron.core import dist_checkpointing

    from hybrid_megatron import checkpoint_layout as layout
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
    with pytest.raises(layout.CheckpointError, match=r"step_00000008 .*a write failed \(disk full"):
        train(_recipe(tmp_path, "train.steps=8"))
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert layout.latest_checkpoint(root).name == "step_00000004"
    assert not list(root.glob("step_00000008*"))  # the broken one: never published, removed

    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    summary, resumed = _train_noting_the_resume(capsys, _recipe(tmp_path, "train.steps=8"))
    assert resumed == "step_00000004"
    assert summary["steps"] == 8 and Path(summary["last_checkpoint"]).name == "step_00000008"
    assert not list(root.glob("*partial*"))


def test_nan_steps_are_skipped_then_abort(single_rank, tmp_path, monkeypatch):
    from hybrid_megatron.training import entry, nan_policy, step

    real = step.run_schedule
    bad_calls = {3, 6, 7, 8}  # schedule calls (= steps here) returning a non-finite loss
    seen = {"n": 0}

    def flaky(model_chunks, micro, seq, forward_only):
        loss = real(model_chunks, micro, seq, forward_only)
        seen["n"] += 1
        return float("nan") if seen["n"] in bad_calls else loss

    monkeypatch.setattr(step, "run_schedule", flaky)
    with pytest.raises(nan_policy.TrainingAborted, match=r"step 8: 3 non-finite losses in a row"):
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


# Quarter-size steps (64 tokens x 4 sequences) for tests about schedules and checkpoints.
_SMALL = ("data.seq_length=64", "train.global_batch_size=4")


# ---- learning-rate schedule -----------------------------------------------------------------
# Megatron-core's convention: step s (1-based) trains at the schedule's value after s - 1
# applied updates; the value after the last update is min_lr. The tables below are written out
# by hand from the recipe's numbers (lr 1e-3, min_lr 1e-4, 20 steps, 4 warmup steps).

_RAMP = [0.0, 2.5e-4, 5.0e-4, 7.5e-4]  # warmup: 0 -> lr over 4 steps, the peak at step 5


def _cosine(n: int) -> float:
    import math

    return 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * (n - 4) / 16))


_SCHEDULES = {
    # wsd_decay_fraction 0.25 of 20 steps: the decay spans the last 5 updates (n = 15 -> 20):
    # peak through step 16, then 8.2e-4, 6.4e-4, 4.6e-4, 2.8e-4, and min_lr after step 20.
    "wsd-0.25": (
        ["train.schedule=wsd", "train.wsd_decay_fraction=0.25"],
        _RAMP + [1e-3] * 12 + [8.2e-4, 6.4e-4, 4.6e-4, 2.8e-4],
        1e-4,
    ),
    # 0.2 of 20 = 4: peak through step 17, then 7.75e-4, 5.5e-4, 3.25e-4.
    "wsd-0.2": (
        ["train.schedule=wsd", "train.wsd_decay_fraction=0.2"],
        _RAMP + [1e-3] * 13 + [7.75e-4, 5.5e-4, 3.25e-4],
        1e-4,
    ),
    # 1.0 would start the decay inside the warmup; it is clamped to the 16 steps after it.
    "wsd-1.0": (
        ["train.schedule=wsd", "train.wsd_decay_fraction=1.0"],
        _RAMP + [1e-3] + [1e-4 + 9e-4 * (16 - k) / 16 for k in range(1, 16)],
        1e-4,
    ),
    "cosine": (["train.schedule=cosine"], _RAMP + [_cosine(n) for n in range(4, 20)], 1e-4),
    "constant": (["train.schedule=constant"], _RAMP + [1e-3] * 16, 1e-3),
}


@pytest.mark.parametrize("name", list(_SCHEDULES))
def test_scheduler_sets_the_lr_of_every_step(single_rank, tmp_path, name):
    """The scheduler the trainer builds, stepped as the trainer steps it, over the real
    optimizer: the lr in every param group at each step, and after the last one."""
    from hybrid_megatron.training.model_setup import build_training_model
    from hybrid_megatron.training.optimizer import build_optimizer, build_scheduler

    extra, expected, final = _SCHEDULES[name]
    recipe = _recipe(
        tmp_path, "train.steps=20", "train.warmup_steps=4", "train.lr=1e-3", "train.min_lr=1e-4", *extra
    )
    optimizer = build_optimizer(recipe.train, build_training_model(recipe))
    scheduler = build_scheduler(recipe.train, optimizer, 20)
    used = []
    for _ in range(20):
        lrs = {g["lr"] for g in optimizer.param_groups}
        assert len(lrs) == 1, lrs  # every group (decayed or not) follows the one schedule
        used.append(lrs.pop())
        scheduler.step(1)
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(final, rel=1e-12)
    if name == "cosine":  # the midpoint of the decay (n = 12, step 13) is halfway to min_lr
        assert used[12] == pytest.approx(5.5e-4, rel=1e-12)
    below_peak = {"wsd-0.25": 4, "wsd-0.2": 3}.get(name)  # D - 1 trained steps, then min_lr
    if below_peak:  # stable: exactly the peak from step 5; decay: strictly falling to the end
        assert used[4 : 20 - below_peak] == [1e-3] * (16 - below_peak)
        assert all(a > b for a, b in zip(used[-below_peak - 1 :], used[-below_peak:]))


def test_wsd_decay_rounds_to_whole_steps(single_rank, tmp_path):
    """7 steps x 0.2 = 1.4 -> a one-step decay: the peak through step 7, min_lr after it."""
    from hybrid_megatron.training.model_setup import build_training_model
    from hybrid_megatron.training.optimizer import build_optimizer, build_scheduler

    recipe = _recipe(
        tmp_path,
        "train.steps=7",
        "train.warmup_steps=1",
        "train.lr=1e-3",
        "train.min_lr=1e-4",
        "train.schedule=wsd",
        "train.wsd_decay_fraction=0.2",
    )
    optimizer = build_optimizer(recipe.train, build_training_model(recipe))
    scheduler = build_scheduler(recipe.train, optimizer, 7)
    assert scheduler.wsd_decay_steps == 1
    used = []
    for _ in range(8):
        used.append(optimizer.param_groups[0]["lr"])
        scheduler.step(1)
    assert used == pytest.approx([0.0] + [1e-3] * 6 + [1e-4], rel=1e-12)


def test_trainer_applies_and_logs_the_wsd_lr_across_a_resume(single_rank, tmp_path, monkeypatch):
    """A real 10-step WSD run, stopped by SIGUSR1 after step 6 and resumed: the lr AdamW used
    at every update (an optimizer step pre-hook) is the hand-written table, and MLflow's
    ``train/lr`` at step s is the lr of step s."""
    from mlflow.tracking import MlflowClient
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from hybrid_megatron.training import entry, trainable

    # 10 steps, 2 warmup, decay round(10 x 0.3) = 3 updates: ramp, peak for steps 3-8, decay.
    expected = [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 7e-4, 4e-4]
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    overrides = [
        "train.steps=10",
        "train.warmup_steps=2",
        "train.lr=1e-3",
        "train.min_lr=1e-4",
        "train.schedule=wsd",
        "train.wsd_decay_fraction=0.3",
        "checkpoint.interval=100",
        "tracking.enabled=true",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=lr",
    ]
    # Artifacts (the loss-curve PNG) under tmp_path, not in ./mlruns of the working directory.
    MlflowClient(tracking_uri=uri).create_experiment("lr", artifact_location=str(tmp_path / "artifacts"))
    applied, in_step = [], []
    real_step = trainable.train_step

    def recording_step(*args, **kwargs):
        in_step.append(True)
        try:
            out = real_step(*args, **kwargs)
        finally:
            in_step.pop()
        if len(applied) == 6 and not stopped:
            stopped.append(True)
            os.kill(os.getpid(), signal.SIGUSR1)  # the trainer's save-and-stop signal
        return out

    def hook(optimizer, args, kwargs):
        if in_step:  # not the dummy step that readies Adam states for a checkpoint load
            applied.append({g["lr"] for g in optimizer.param_groups})

    stopped = []
    monkeypatch.setattr(trainable, "train_step", recording_step)
    handle = register_optimizer_step_pre_hook(hook)
    try:
        first = entry.train(_recipe(tmp_path, *_SMALL, *overrides))
        assert first["steps"] == 6 and first["stopped_by_signal"] == signal.SIGUSR1
        assert Path(first["last_checkpoint"]).name == "step_00000006"
        second = entry.train(_recipe(tmp_path, *_SMALL, *overrides))
    finally:
        handle.remove()
    assert second["steps"] == 10 and second["mlflow_run_id"] == first["mlflow_run_id"]
    assert all(len(lrs) == 1 for lrs in applied)
    assert [lrs.pop() for lrs in applied] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    history = MlflowClient(tracking_uri=uri).get_metric_history(first["mlflow_run_id"], "train/lr")
    logged = {m.step: m.value for m in history}
    assert sorted(logged) == list(range(1, 11))
    assert [logged[s] for s in range(1, 11)] == pytest.approx(expected, rel=1e-12, abs=1e-15)


# ---- keep_last pruning and odd saves --------------------------------------------------------


def _stopping_after(n: int, real_step):
    """A train_step that sends this process SIGUSR1 (the trainer's save-and-stop signal) after
    its n-th call; the trainer then saves and returns after that step."""
    calls = []

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    return step


def _step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def _latest(root: Path) -> str:
    return (root / "latest").read_text().strip()


def _train_noting_the_resume(capsys, recipe) -> tuple[dict, str | None]:
    """Run ``train(recipe)`` on this rank; returns its summary and the checkpoint directory name
    it resumed from, read from its log (None for a run that started fresh). A run that ignored
    its checkpoint and started over would log the same losses, so the tests check this too."""
    from hybrid_megatron.training.entry import train

    capsys.readouterr()  # drop the earlier runs' output
    summary = train(recipe)
    resumed = re.findall(r"resumed from (\S+) at step \d+", capsys.readouterr().out)
    return summary, Path(resumed[-1]).name if resumed else None


def test_keep_last_prunes_to_the_newest_k_and_resumes(single_rank, tmp_path, monkeypatch):
    """Saves every 2 steps, keep_last 2, stopped after step 5 and resumed to step 7: after
    every save exactly the newest two step_* directories remain, ``latest`` names the newest,
    and the resumed losses equal an uninterrupted run's bitwise."""
    from hybrid_megatron.training import checkpointing, entry, trainable

    extra = (*_SMALL, "train.steps=7", "checkpoint.interval=2", "checkpoint.keep_last=2")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    seen = []
    real_save = checkpointing.save_checkpoint

    def listing_save(root, *args, **kwargs):
        path = real_save(root, *args, **kwargs)
        seen.append((path.name, _latest(Path(root)), _step_dirs(Path(root))))
        return path

    monkeypatch.setattr(checkpointing, "save_checkpoint", listing_save)
    entry.train(_recipe(ref_dir, *extra))
    assert seen == [
        ("step_00000002", "step_00000002", ["step_00000002"]),
        ("step_00000004", "step_00000004", ["step_00000002", "step_00000004"]),
        ("step_00000006", "step_00000006", ["step_00000004", "step_00000006"]),
        ("step_00000007", "step_00000007", ["step_00000006", "step_00000007"]),  # save on exit
    ]
    reference = read_losses(ref_dir)
    assert sorted(reference) == list(range(1, 8))

    seen.clear()
    real_step = trainable.train_step
    monkeypatch.setattr(trainable, "train_step", _stopping_after(5, real_step))
    first = entry.train(_recipe(cut_dir, *extra))
    assert first["steps"] == 5
    monkeypatch.setattr(trainable, "train_step", real_step)
    second = entry.train(_recipe(cut_dir, *extra))
    assert second["steps"] == 7
    assert seen == [
        ("step_00000002", "step_00000002", ["step_00000002"]),
        ("step_00000004", "step_00000004", ["step_00000002", "step_00000004"]),
        ("step_00000005", "step_00000005", ["step_00000004", "step_00000005"]),  # on the signal
        ("step_00000006", "step_00000006", ["step_00000005", "step_00000006"]),  # after resuming
        ("step_00000007", "step_00000007", ["step_00000006", "step_00000007"]),
    ]
    resumed = read_losses(cut_dir)
    assert sorted(resumed) == list(range(1, 8))
    assert resumed == reference


def test_resume_into_a_model_with_more_extra_state_than_saved(single_rank, tmp_path, monkeypatch, capsys):
    """A checkpoint without one layer's TE extra state (as when model.fp8_output_layer is
    switched on at a resume: the LM head becomes a TE layer) resumes, that entry keeping its
    fresh value, and continues the uninterrupted run bitwise (the local layers' extra state is
    empty). A checkpoint missing a weight is refused, naming the checkpoint."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from hybrid_megatron.training import checkpoint as ckpt
    from hybrid_megatron.training import entry, trainable

    extra = (*_SMALL, "train.steps=5", "checkpoint.interval=100")
    entry.train(_recipe(tmp_path / "ref", *extra))
    real_state, real_step = ckpt._sharded_state, trainable.train_step
    dropped = []

    def stopped_after_3_saving_without(run_dir, key_is_dropped):
        """Train until SIGUSR1 after step 3; that save leaves out the first matching key."""

        def state(*args, loading, **kwargs):
            out = real_state(*args, loading=loading, **kwargs)
            if not loading:
                dropped.append(next(k for k, v in out["model"].items() if key_is_dropped(k, v)))
                out["model"].pop(dropped[-1])
            return out

        monkeypatch.setattr(ckpt, "_sharded_state", state)
        monkeypatch.setattr(trainable, "train_step", _stopping_after(3, real_step))
        assert entry.train(_recipe(run_dir, *extra))["steps"] == 3
        monkeypatch.setattr(ckpt, "_sharded_state", real_state)
        monkeypatch.setattr(trainable, "train_step", real_step)

    stopped_after_3_saving_without(
        tmp_path / "cut", lambda k, v: k.endswith("._extra_state") and isinstance(v, ShardedObject)
    )
    assert dropped[-1].endswith("._extra_state")
    summary, resumed = _train_noting_the_resume(capsys, _recipe(tmp_path / "cut", *extra))
    assert resumed == "step_00000003" and summary["steps"] == 5
    assert read_losses(tmp_path / "cut") == read_losses(tmp_path / "ref")

    stopped_after_3_saving_without(tmp_path / "bad", lambda k, v: k.endswith(".weight"))
    with pytest.raises(ckpt.CheckpointError, match="cannot load checkpoint .*step_00000003"):
        entry.train(_recipe(tmp_path / "bad", *extra))


def test_resume_refuses_a_checkpoint_of_another_model(single_rank, tmp_path):
    """A resume into a model with fewer layers would load the first layers and drop the rest
    without a word (megatron-core loads what the model asks for). It is refused, naming the
    checkpoint and a weight the recipe's model lacks; nothing is trained or written."""
    from hybrid_megatron.training import checkpoint as ckpt
    from hybrid_megatron.training.entry import train

    extra = (*_SMALL, "checkpoint.interval=2", "train.warmup_steps=1")
    train(_recipe(tmp_path, *extra, "train.steps=2", "model.num_layers=4"))
    root = tmp_path / "checkpoints"
    before = _step_dirs(root)
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"step_00000002: it holds another model than "
        r"the recipe's: \d+ weights the recipe's model lacks \(decoder\.layers\.2\.",
    ):
        train(_recipe(tmp_path, *extra, "train.steps=4"))  # 2 layers
    assert _step_dirs(root) == before and _latest(root) == "step_00000002"


def test_resume_refuses_the_retired_per_ep_optimizer_keys(single_rank, tmp_path, monkeypatch):
    """A checkpoint whose optimizer keys carry megatron-core's per-EP ``chained_<i>.`` prefixes
    (the format before OPTIMIZER_FORMAT dropped them) gets one error naming the checkpoint and
    the way out; the checkpoint itself is left as it was."""
    from hybrid_megatron.training import checkpoint as ckpt
    from hybrid_megatron.training import entry

    run = (*_SMALL, "checkpoint.interval=100")
    entry.train(_recipe(tmp_path, *run, "train.steps=3"))
    step_dir = next((tmp_path / "checkpoints").glob("step_*"))
    files = sorted(p.name for p in step_dir.iterdir())
    real_metadata = ckpt._saved_metadata

    def with_a_chained_key(path):
        saved = real_metadata(path)
        key = next(k for k in saved if k.startswith("optimizer."))
        return {**saved, f"chained_0.{key}": saved[key]}

    monkeypatch.setattr(ckpt, "_saved_metadata", with_a_chained_key)
    with pytest.raises(ckpt.CheckpointError, match=f"{step_dir.name}.*retired per-EP 'chained_' keys"):
        entry.train(_recipe(tmp_path, *run, "train.steps=4"))
    assert sorted(p.name for p in step_dir.iterdir()) == files


def test_resume_restores_the_rng_streams(single_rank, tmp_path, monkeypatch):
    """The RNG state saved with a checkpoint is the one a resumed run continues from (the CPU
    generator and megatron's tracker streams), not the seed's: a resume that missed it would
    silently restart every stream from the seed."""
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from hybrid_megatron.training import checkpointing, entry

    def streams():
        return {
            "cpu": torch.get_rng_state(),
            **{k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
        }

    saves, loads = [], []
    real_save, real_load = checkpointing.save_checkpoint, checkpointing.load_checkpoint

    def save(*args, **kwargs):
        torch.rand(3)  # move the streams away from anything the seed gives
        with get_cuda_rng_tracker().fork():
            torch.rand(3)
        saves.append(streams())
        return real_save(*args, **kwargs)

    def load(*args, **kwargs):
        out = real_load(*args, **kwargs)
        loads.append(streams())
        return out

    monkeypatch.setattr(checkpointing, "save_checkpoint", save)
    monkeypatch.setattr(checkpointing, "load_checkpoint", load)
    entry.train(_recipe(tmp_path, *_SMALL, "train.steps=4"))  # saves once, on finishing
    assert len(saves) == 1 and not loads
    assert entry.train(_recipe(tmp_path, *_SMALL, "train.steps=5"))["steps"] == 5
    assert len(loads) == 1 and len(saves[0]) > 1 and loads[0].keys() == saves[0].keys()
    for name, state in saves[0].items():
        assert torch.equal(loads[0][name], state), name


def test_graph_safe_rng_streams_are_restored_into_the_live_generators():
    """With CUDA graphs the tracker's streams are generator objects that a graph capture
    registers; a resume must set their states in place, not swap in new objects (the graphed
    resume on a GPU failed at capture when it did). CPU generators stand in for CUDA ones: the
    rule is the same, only the device differs."""
    import torch

    from hybrid_megatron.training.checkpoint import set_tracker_states

    class Tracker:  # megatron's tracker interface: get_states / set_states
        def __init__(self, states):
            self.states_ = states

        def get_states(self):
            return dict(self.states_)

        def set_states(self, states):
            self.states_ = states

    live = {
        "model-parallel-rng": torch.Generator().manual_seed(1),
        "data-parallel-rng": torch.Generator().manual_seed(2),
    }
    saved = {
        name: torch.Generator().manual_seed(10 + i).get_state()
        for i, name in enumerate([*live, "a-stream-this-run-lacks"])
    }
    tracker = Tracker(dict(live))
    set_tracker_states(tracker, saved, graph_safe=True)
    assert tracker.states_.keys() == live.keys()
    for name, generator in live.items():
        assert tracker.states_[name] is generator, name  # the registered object stays
        assert torch.equal(generator.get_state(), saved[name]), name
    # A plain tracker holds tensors and takes the saved ones.
    plain = Tracker({})
    set_tracker_states(plain, saved, graph_safe=False)
    assert plain.states_.keys() == saved.keys()


def test_keep_last_1_with_a_failed_save_keeps_the_latest(single_rank, tmp_path, monkeypatch, capsys):
    """keep_last 1: the save at step 4 dies half-way. ``latest`` still names step 2, which
    still exists and loads; the resumed run finishes with only its newest checkpoint left."""
    from megatron.core import dist_checkpointing

    from hybrid_megatron import checkpoint_layout as layout
    from hybrid_megatron.training.entry import train

    real_save = dist_checkpointing.save
    calls = []

    def failing_second_save(state, directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 2:
            (Path(directory) / "half_written.distcp").write_bytes(b"\0" * 100)
            raise OSError("disk full (simulated)")
        return real_save(state, directory, *args, **kwargs)

    extra = (*_SMALL, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=1")
    root = tmp_path / "checkpoints"
    monkeypatch.setattr(dist_checkpointing, "save", failing_second_save)
    with pytest.raises(layout.CheckpointError, match="disk full"):
        train(_recipe(tmp_path, *extra))
    assert _latest(root) == "step_00000002"
    assert (root / "step_00000002" / "metadata.json").exists()
    assert [d for d in _step_dirs(root) if ".partial-" not in d] == ["step_00000002"]
    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    summary, resumed = _train_noting_the_resume(capsys, _recipe(tmp_path, *extra))
    assert resumed == "step_00000002"
    assert summary["steps"] == 6 and read_losses(tmp_path).keys() == set(range(1, 7))
    assert _step_dirs(root) == ["step_00000006"] and _latest(root) == "step_00000006"
    assert layout.latest_checkpoint(root).name == "step_00000006"


def test_rerun_in_a_used_directory_never_prunes_what_latest_names(single_rank, tmp_path, capsys):
    """keep_last 1; a first run leaves step 6; a rerun with ``resume: none`` saves step 3.
    Pruning by name alone kept step 6 and deleted step 3, leaving ``latest`` dangling."""
    from hybrid_megatron import checkpoint_layout as layout
    from hybrid_megatron.training.entry import train

    root = tmp_path / "checkpoints"
    keep1 = (*_SMALL, "checkpoint.interval=3", "checkpoint.keep_last=1")
    train(_recipe(tmp_path, "train.steps=6", *keep1))
    assert _step_dirs(root) == ["step_00000006"]
    train(_recipe(tmp_path, "train.steps=3", "checkpoint.resume=none", *keep1))
    assert _latest(root) == "step_00000003"
    assert layout.latest_checkpoint(root).name == "step_00000003"
    assert _step_dirs(root) == ["step_00000003", "step_00000006"]  # the other run's is kept
    summary, resumed = _train_noting_the_resume(capsys, _recipe(tmp_path, "train.steps=6", *keep1))
    assert resumed == "step_00000003"  # resume: auto takes what latest names, not step 6
    assert summary["steps"] == 6 and read_losses(tmp_path)  # steps 4-6 trained after the resume
    assert _step_dirs(root) == ["step_00000006"] and _latest(root) == "step_00000006"


def test_resaving_the_latest_step_survives_a_crash_while_replacing_it(
    single_rank, tmp_path, monkeypatch, capsys
):
    """keep_last 1; a rerun from scratch saves step 4 again, where ``latest`` points; the
    process dies while deleting the old step 4. ``latest`` names the new complete copy, and
    a resume from it finishes the run."""
    import shutil as shutil_module

    from hybrid_megatron import checkpoint_layout as layout
    from hybrid_megatron.training.entry import train

    root = tmp_path / "checkpoints"
    keep1 = (*_SMALL, "train.steps=4", "checkpoint.interval=4", "checkpoint.keep_last=1")
    train(_recipe(tmp_path, *keep1))
    assert _step_dirs(root) == ["step_00000004"]

    real_rmtree = shutil_module.rmtree

    def dies_half_way(path, *args, **kwargs):
        if Path(path) == root / "step_00000004":
            for shard in sorted(Path(path).glob("*.distcp"))[:1]:
                shard.unlink()  # part of the old copy is gone, metadata.json is still there
            raise OSError("killed while deleting (simulated)")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(layout.shutil, "rmtree", dies_half_way)
    with pytest.raises(layout.CheckpointError, match="killed while deleting"):
        train(_recipe(tmp_path, *keep1, "checkpoint.resume=none"))
    monkeypatch.setattr(layout.shutil, "rmtree", real_rmtree)
    latest = layout.latest_checkpoint(root)
    assert latest.name.startswith("step_00000004.partial-")  # the new, complete copy
    assert (latest / "metadata.json").exists() and (latest / "recipe.yaml").exists()

    summary, resumed = _train_noting_the_resume(
        capsys, _recipe(tmp_path, *_SMALL, "train.steps=6", "checkpoint.interval=4", "checkpoint.keep_last=1")
    )
    assert resumed == latest.name  # the .partial- copy loads
    assert summary["steps"] == 6
    log = read_losses(tmp_path)
    assert sorted(log) == list(range(1, 7))
    assert _step_dirs(root) == ["step_00000006"] and _latest(root) == "step_00000006"


@pytest.mark.slow
def test_stop_signal_to_one_rank_stops_all_ranks_after_the_same_step(tmp_path):
    """TP=2 on two gloo ranks; SIGUSR1 reaches rank 1 only (signals reach a job's ranks at
    different moments). Both ranks stop after the same step and save it together; before
    the ranks agreed, rank 1 went to save while rank 0 trained on (mismatched collectives)."""
    run = tmp_path / "run"
    procs = start_job(
        RECIPE,
        _overrides(run, "parallel.tp=2", "train.steps=200", "checkpoint.interval=100", *_SMALL),
        2,
        run / "logs",
    )
    deadline = time.time() + 300
    while max(read_losses(run), default=0) < 3:
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGUSR1)
    assert wait_job(procs, timeout=180) == [0, 0]
    steps = sorted(read_losses(run))
    stopped_at = steps[-1]
    assert steps == list(range(1, stopped_at + 1)) and 3 <= stopped_at < 200
    root = run / "checkpoints"
    assert _latest(root) == f"step_{stopped_at:08d}" and _step_dirs(root) == [f"step_{stopped_at:08d}"]
    assert (root / f"step_{stopped_at:08d}" / "metadata.json").exists()
    assert f"done: {stopped_at} steps" in (run / "logs" / "rank0.log").read_text()


# ---- the Trainer's components on their own --------------------------------------------------


def test_nan_policy_counts_skips_and_aborts_at_the_nth_in_a_row(capsys):
    from hybrid_megatron.training.checkpoint import TrainingState
    from hybrid_megatron.training.nan_policy import NanPolicy, TrainingAborted

    policy, state = NanPolicy(max_consecutive=2), TrainingState()
    for step, applied in enumerate([True, False, True, False], start=1):
        state.step = step
        policy.record(state, 1.0 if applied else float("nan"), applied)
    assert (state.skipped_steps, state.consecutive_nan_skips) == (2, 1)
    assert "step 4: non-finite loss nan; update skipped (1 in a row)" in capsys.readouterr().out
    state.step = 5
    with pytest.raises(
        TrainingAborted,
        match=r"^step 5: 2 non-finite losses in a row "
        r"\(train.max_consecutive_nan_skips=2\)$",
    ):
        policy.record(state, float("inf"), False)
    assert (state.skipped_steps, state.consecutive_nan_skips) == (3, 2)


def test_loss_log_writes_every_step_exactly_and_prints_at_the_interval(tmp_path, capsys):
    import json

    from hybrid_megatron.training.loss_log import LOSS_LOG, LossLog

    # Created at t=0; the first step ends at t=10 (warm-up), each later one 2 s after.
    times = iter([0.0] + [10.0 + 2 * k for k in range(6)])
    log = LossLog(tmp_path, log_interval=3, total_steps=6, active=True, clock=lambda: next(times))
    printed = []
    for step in range(1, 7):
        metrics = {
            "train/loss": 1.0 / step,
            "train/lr": 1e-3,
            "train/grad_norm": None,
            "train/tokens_per_s": 1234.5,
            "train/mfu": 0.25 if step == 6 else None,
            "train/memory_gib": 0.5,
        }
        printed.append(log.record(step, metrics))
    assert printed == [True, False, True, False, False, True]
    records = [json.loads(line) for line in (tmp_path / LOSS_LOG).read_text().splitlines()]
    assert [float.fromhex(r["loss"]) for r in records] == [1.0 / s for s in range(1, 7)]
    assert records[-1] == {"step": 6, "loss": (1.0 / 6).hex(), "tokens_per_s": 1234.5, "mfu": 0.25}
    assert capsys.readouterr().out.splitlines() == [
        # the first step's pace (10 s) for the 5 left; then the later steps' (2 s) for the 3 left
        "step 1/6 loss 1.0000 lr 1.00e-03 grad_norm nan tokens/s 1,234 mem 0.50GiB"
        " | 17% elapsed 0:00:10 left 0:00:50",
        "step 3/6 loss 0.3333 lr 1.00e-03 grad_norm nan tokens/s 1,234 mem 0.50GiB"
        " | 50% elapsed 0:00:14 left 0:00:06",
        "step 6/6 loss 0.1667 lr 1.00e-03 grad_norm nan tokens/s 1,234 mfu 25.0% mem 0.50GiB"
        " | 100% elapsed 0:00:20 left 0:00:00",
    ]
    # the last step prints off the interval too
    last = LossLog(tmp_path / "last", log_interval=4, total_steps=6, active=False)
    assert [last.record(step, metrics) for step in range(1, 7)] == [True, False, False, True, False, True]
    LossLog(tmp_path / "other", log_interval=1, total_steps=1, active=False).record(1, metrics)
    assert not (tmp_path / "other").exists()  # ranks other than 0 write nothing


def test_progress_text_gives_the_share_done_the_time_spent_and_the_time_left():
    from hybrid_megatron.training.loss_log import clock_text, progress_text

    assert clock_text(3725.4) == "1:02:05" and clock_text(0.4) == "0:00:00"
    assert clock_text(90 * 3600) == "90:00:00"  # hours unbounded
    assert progress_text(250, 1000, 3600.0, 43.2) == "25% elapsed 1:00:00 left 9:00:00"
    assert progress_text(1000, 1000, 5.0, 43.2) == "100% elapsed 0:00:05 left 0:00:00"


def test_checkpointing_saves_on_the_interval_and_once_more_on_exit(tmp_path, monkeypatch, capsys):
    from hybrid_megatron.config.checkpoint import CheckpointConfig
    from hybrid_megatron.training import checkpointing
    from hybrid_megatron.training.checkpoint import TrainingState
    from hybrid_megatron.training.trainable import Trainable

    saves = []

    def save(root, chunks, optimizer, scheduler, state, keep_last, recipe_yaml):
        saves.append((state.step, keep_last, recipe_yaml))
        return Path(root) / f"step_{state.step:08d}"

    monkeypatch.setattr(checkpointing, "save_checkpoint", save)
    cfg = CheckpointConfig(dir=str(tmp_path), interval=4, keep_last=2)
    ckpt, trainable, state = (
        checkpointing.Checkpointing(cfg, "name: x\n"),
        Trainable([], None, None),
        TrainingState(),
    )
    assert ckpt.resume(ckpt.resume_path(), trainable) == TrainingState()  # nothing saved yet
    for step in range(1, 9):
        state.step = step
        ckpt.after_step(trainable, state)
    ckpt.at_exit(trainable, state)  # step 8 is saved already
    state.step = 9
    ckpt.at_exit(trainable, state)
    assert saves == [(4, 2, "name: x\n"), (8, 2, "name: x\n"), (9, 2, "name: x\n")]
    assert ckpt.last_saved == tmp_path / "step_00000009"
    assert f"saved checkpoint {tmp_path / 'step_00000009'}" in capsys.readouterr().out


def test_validation_runs_on_the_interval_and_at_an_unvalidated_end(monkeypatch, capsys):
    from hybrid_megatron.training import validation

    calls = []
    monkeypatch.setattr(
        validation, "evaluate", lambda chunks, batches, seq: calls.append(seq) or 2.5 + len(calls)
    )

    class Tracker:
        logged = []

        def log_metrics(self, metrics, step):
            self.logged.append((step, metrics))

    check = validation.Validation(["batch"], interval=3, seq_length=64, tracker=Tracker())
    for step in range(1, 7):
        check.after_step([], step)
    check.at_end([], 6)  # step 6 was validated already
    assert Tracker.logged == [(3, {"val/loss": 3.5}), (6, {"val/loss": 4.5})]
    check.at_end([], 7)
    assert Tracker.logged[-1] == (7, {"val/loss": 5.5}) and check.loss == 5.5
    assert "step 6: validation loss 4.5000" in capsys.readouterr().out
    none = validation.Validation(None, interval=3, seq_length=64, tracker=Tracker())
    none.after_step([], 3)
    none.at_end([], 3)
    assert none.loss is None and calls == [64, 64, 64]


@pytest.mark.long
def test_cp2_run_matches_cp1_and_resumes_at_cp1(tmp_path):
    """30 steps with every sequence split over 2 ranks (context parallel) log CP=1's losses
    (fp32, another reduction order); the CP=2 checkpoint of step 8 resumes at CP=1 (weights
    and optimizer states resharded from the dp x cp group of 2 to 1) and continues CP=1's run."""
    recipe = str(REPO / "recipes" / "transformer_tiny.yaml")
    ref_dir, cp_dir, back_dir = tmp_path / "cp1", tmp_path / "cp2", tmp_path / "back"
    steps = ["train.steps=30", "checkpoint.interval=8", "checkpoint.keep_last=10"]
    assert wait_job(start_job(recipe, _overrides(ref_dir, *steps), 1, ref_dir / "logs")) == [0]
    cp2 = [*steps, "parallel.cp=2"]
    assert wait_job(start_job(recipe, _overrides(cp_dir, *cp2), 2, cp_dir / "logs")) == [0, 0]
    reference, split = read_losses(ref_dir), read_losses(cp_dir)
    assert sorted(reference) == sorted(split) == list(range(1, 31))
    for step in reference:
        a, b = float.fromhex(split[step]), float.fromhex(reference[step])
        assert abs(a - b) < 2e-4, (step, a, b)
    assert float.fromhex(reference[30]) < float.fromhex(reference[1]) - 0.5  # it learns
    shutil.copytree(cp_dir / "checkpoints" / "step_00000008", back_dir / "ckpt" / "step_00000008")
    resume = [*steps, f"checkpoint.resume={back_dir}/ckpt/step_00000008"]
    assert wait_job(start_job(recipe, _overrides(back_dir, *resume), 1, back_dir / "logs")) == [0]
    resumed = read_losses(back_dir)
    assert sorted(resumed) == list(range(9, 31))
    for step in resumed:
        a, b = float.fromhex(resumed[step]), float.fromhex(reference[step])
        assert abs(a - b) < 2e-4, (step, a, b)


# ---- damaged checkpoints met by init_from and by the convert / evaluation loader ----------


def _damage(step_dir: Path, kind: str) -> Path:
    """Damage ``step_dir`` as named; returns the damaged file."""
    from torch.distributed.checkpoint import FileSystemReader

    if kind in ("common.pt", ".metadata"):
        (step_dir / kind).unlink()
        return step_dir / kind
    storage = FileSystemReader(str(step_dir)).read_metadata().storage_data
    # a weight's record (every loader reads it)
    weights = sorted(
        (i.relative_path, i.offset)
        for key, i in storage.items()
        if key.fqn.startswith("decoder.") and "_extra_state" not in key.fqn
    )
    name, offset = weights[len(weights) // 2]
    data = bytearray((step_dir / name).read_bytes())
    if kind == "truncated-shard":
        data = data[: len(data) // 2]
    else:  # its zip header zeroed, the size unchanged
        data[offset : offset + 64] = bytes(64)
    (step_dir / name).write_bytes(bytes(data))
    return step_dir / name


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("truncated-shard", r"shard {file} is truncated \(\d+ bytes; its records end at byte \d+\)"),
        ("corrupt-shard", r"shard {file} is corrupt \(its record at byte \d+: "),
        ("common.pt", r"{file} is missing \(megatron-core's common state\)"),
        (".metadata", r"{file} is missing \(the index of its shards\)"),
    ],
)
def test_init_from_and_the_model_loader_name_the_damaged_file(single_rank, tmp_path, kind, expected):
    """checkpoint.init_from and load_trained_model (convert's and evaluation's loader) meet a
    damaged checkpoint (a model-only save of a tiny model) with one CheckpointError naming the
    file, as a resume does; the intact copy loads in both."""
    from hybrid_megatron.checkpoint_layout import CheckpointError
    from hybrid_megatron.config import load_recipe
    from hybrid_megatron.config.parallel import ParallelConfig
    from hybrid_megatron.models import build_model
    from hybrid_megatron.training.checkpoint import TrainingState, save_checkpoint
    from hybrid_megatron.training.parallel_setup import setup_model_parallel
    from hybrid_megatron.training.restore import init_weights_from, load_trained_model

    recipe = load_recipe(RECIPE, ["tracking.enabled=false", f"checkpoint.dir={tmp_path}/ckpt"])
    setup_model_parallel(ParallelConfig(), seed=1)
    model = build_model(recipe.model)
    root = str(tmp_path / "ckpt")
    step_dir = save_checkpoint(root, [model], None, None, TrainingState(step=2), 1, recipe.to_yaml())
    intact = tmp_path / "intact"
    shutil.copytree(root, intact)
    assert init_weights_from(intact, [model], recipe.model) == intact / step_dir.name
    assert load_trained_model(intact)[0].model == recipe.model

    damaged = _damage(step_dir, kind)
    pattern = expected.format(file=re.escape(str(damaged)))
    for load, prefix in (
        (lambda: init_weights_from(root, [model], recipe.model), "checkpoint.init_from: "),
        (lambda: load_trained_model(root), ""),
    ):
        with pytest.raises(CheckpointError) as caught:
            load()
        message = str(caught.value)
        assert message.startswith(prefix) and re.search(pattern, message), message
        assert "\n" not in message and "Traceback" not in message
