"""bench/convergence.py: the checks' verdicts on loss logs written by the trainer's LossLog."""

from __future__ import annotations

import json
import math

import pytest

from bench import convergence
from hybrid_megatron.training.loss_log import LossLog


def _write_run(run_dir, losses: dict[int, float], moe: dict | None = None, restart_at: int | None = None):
    """A run folder whose train_log.jsonl holds ``losses`` (as LossLog writes them); with
    ``restart_at`` the steps after it are written again (a resumed run's repeat)."""
    log = LossLog(run_dir, log_interval=1000, total_steps=max(losses), active=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    def record(step):
        metrics = {
            "train/loss": losses[step],
            "train/tokens_per_s": 1.0,
            "train/mfu": None,
            "train/lr": 1e-3,
            "train/grad_norm": 1.0,
            "train/memory_gib": 0.0,
            **(moe or {}).get(step, {}),
        }
        log.record(step, metrics)

    for step in sorted(losses):
        record(step)
        if restart_at is not None and step == restart_at + 3:
            for again in range(restart_at + 1, step + 1):
                record(again)
    return run_dir


def _curve(n=300, scale=1.0):
    return {s: scale * (2.0 + 8.0 * math.exp(-s / 60)) for s in range(1, n + 1)}


def _run(tmp_path, *argv):
    code = convergence.main([*argv, "--out", str(tmp_path / "out"), "--name", "x"])
    return code, json.loads((tmp_path / "out" / "x.json").read_text())


def test_every_step_passes_within_and_fails_beyond_the_tolerance(tmp_path):
    a = _write_run(tmp_path / "a", _curve())
    b = _write_run(tmp_path / "b", {s: v * (1 + 5e-4) for s, v in _curve().items()})
    code, verdict = _run(tmp_path, "every-step", str(a), str(b))
    assert code == 0 and verdict["passed"] and verdict["steps_compared"] == 300
    assert verdict["max_relative_difference"] == pytest.approx(5e-4 / (1 + 5e-4), rel=1e-6)
    assert (tmp_path / "out" / "x.png").stat().st_size > 1000
    off = dict(_curve())
    off[150] *= 1.002  # one step 0.2% off
    c = _write_run(tmp_path / "c", off)
    code, verdict = _run(tmp_path, "every-step", str(c), str(a))
    assert code == 1 and verdict["max_at_step"] == 150 and verdict["steps_over_tolerance"] == 1


def test_resume_is_bitwise_after_the_restart_and_names_it(tmp_path):
    a = _write_run(tmp_path / "a", _curve())
    b = _write_run(tmp_path / "b", _curve(), restart_at=120)
    code, verdict = _run(tmp_path, "resume", str(a), str(b))
    assert code == 0 and verdict["verdict"] == "bitwise" and verdict["resumed_after_step"] == 120
    assert verdict["steps_compared"] == 180
    later = {s: (v if s <= 120 else v * (1 + 1e-5)) for s, v in _curve().items()}
    c = _write_run(tmp_path / "c", later)
    code, verdict = _run(tmp_path, "resume", str(a), str(c), "--resumed-after", "120")
    assert code == 0 and verdict["verdict"] == "within tolerance" and not verdict["bitwise"]


def test_spikes_are_found_and_expert_load_is_summarised(tmp_path):
    losses = _curve()
    losses[200] *= 1.5
    moe = {s: {"moe/max_over_mean": 1.0 + 1.0 / s} for s in range(10, 301, 10)}
    a = _write_run(tmp_path / "a", losses, moe)
    code, verdict = _run(tmp_path, "spikes", str(a))
    assert code == 1 and [s["step"] for s in verdict["spikes"]] == [200]
    assert verdict["expert_load"]["logged_steps"] == 30
    assert verdict["expert_load"]["max_over_mean_worst"] == pytest.approx(1.1)
    assert verdict["expert_load"]["max_over_mean_last"] == pytest.approx(1 + 1 / 300)


def test_final_val_needs_tracked_runs(tmp_path, capsys):
    a = _write_run(tmp_path / "a", _curve())
    code = convergence.main(["final-val", str(a), str(a), "--out", str(tmp_path / "out")])
    assert code == 2 and "run a has no val/loss in its MLflow store" in capsys.readouterr().err
    assert convergence.check_final_val(
        {"val/loss": [(100, 3.0), (200, 2.0)]}, {"val/loss": [(100, 3.1), (200, 2.015)]}, 0.01
    )["passed"]
    assert not convergence.check_final_val({"val/loss": [(200, 2.0)]}, {"val/loss": [(200, 2.03)]}, 0.01)[
        "passed"
    ]
