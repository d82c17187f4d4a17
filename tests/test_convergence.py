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


# Run records: a finished run's folder, kept as one JSON file across machines that start bare.

DIGEST, TOKENIZER_SHA = "d1" * 32, "7e" * 32
CHECK_VERDICT_KEYS_OF_PLACE = ("runs", "plot")  # where the inputs were: differs by design


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Makes tracked run folders as the trainer leaves them: train_log.jsonl, a checkpoint with
    the saved recipe (the convergence recipe on a fake corpus whose stats name DIGEST), the
    MLflow store with val/loss, train/loss, moe/* and system/* metrics, and mlflow_run_id."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from hybrid_megatron.config import load_recipe

    root = tmp_path_factory.mktemp("tracked")
    corpus = root / "corpus"
    corpus.mkdir()
    facts = {"files_digest": DIGEST, "tokenizer": {"sha256": TOKENIZER_SHA, "vocab_size": 32768}}
    (corpus / "code_train.stats.json").write_text(json.dumps(facts))
    (corpus / "code.manifest.json").write_text(json.dumps(facts))
    uri = f"sqlite:///{root / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("convergence", artifact_location=(root / "art").as_uri())

    def make(run_dir, losses, val, restart_at=None, moe=None):
        _write_run(run_dir, losses, moe=moe, restart_at=restart_at)
        run_id = client.create_run(experiment).info.run_id
        metrics = [Metric("val/loss", v, 0, s) for s, v in val]
        metrics += [Metric("train/loss", losses[s], 0, s) for s in range(10, max(losses) + 1, 10)]
        metrics += [Metric("moe/max_over_mean", 1.0 + 10 / s, 0, s) for s in range(10, max(losses) + 1, 10)]
        metrics += [Metric("system/gpu_utilization_percentage", 90.0, 0, 1)]
        client.log_batch(run_id, metrics=metrics)
        recipe = load_recipe(
            "recipes/convergence/inter_100m_code.yaml",
            [f"data.blend={corpus / 'code_train'}", f"tracking.tracking_uri={uri}"],
        )
        step_dir = run_dir / "checkpoints" / f"step_{max(losses):08d}"
        step_dir.mkdir(parents=True)
        (step_dir / "metadata.json").write_text("{}")
        (step_dir / "recipe.yaml").write_text(recipe.to_yaml())
        (run_dir / "checkpoints" / "latest").write_text(step_dir.name)
        (run_dir / "checkpoints" / "mlflow_run_id").write_text(run_id)
        return run_dir

    return {"make": make, "root": root, "manifest": corpus / "code.manifest.json"}


def _verdict_facts(verdict):
    return {k: v for k, v in verdict.items() if k not in CHECK_VERDICT_KEYS_OF_PLACE}


def test_a_record_gives_the_run_folders_verdicts(tracked, tmp_path, capsys):
    make = tracked["make"]
    losses = _curve()
    spiky = dict(losses)
    spiky[200] *= 1.5
    a = make(tmp_path / "a", losses, [(100, 3.0), (300, 2.5)])
    b = make(tmp_path / "b", {s: v * (1 + 2e-4) for s, v in losses.items()}, [(100, 3.1), (300, 2.52)])
    resumed = make(tmp_path / "resumed", losses, [(100, 3.0), (300, 2.5)], restart_at=120)
    moe = {s: {"moe/max_over_mean": 1.0 + 1.0 / s} for s in range(10, 301, 10)}
    spikes = make(tmp_path / "spikes", spiky, [(300, 2.6)], moe=moe)
    records = tmp_path / "records"
    for run in (a, b, resumed, spikes):
        assert convergence.main(["record", str(run), "--out", str(records)]) == 0
    assert f"{records / 'resumed.record.json'}: 300 steps, 3 metrics" in capsys.readouterr().out

    record = json.loads((records / "resumed.record.json").read_text())
    assert record["name"] == "resumed" and record["last_step"] == 300 and record["resumed_after"] == 120
    assert record["checkpoint"] == "step_00000300"
    assert record["identity"]["corpus_files_digest"] == DIGEST
    assert record["identity"]["tokenizer_sha256"] == TOKENIZER_SHA
    assert record["recipe"]["train"]["steps"] == 2000 and record["recipe"]["model"]["vocab_size"] == 32768
    assert sorted(record["metrics"]) == ["moe/max_over_mean", "train/loss", "val/loss"]  # no system/*
    assert record["metrics"]["val/loss"] == [[100, 3.0], [300, 2.5]]
    assert len(record["train_log"]) == 303  # steps 121-123 logged twice, as the folder holds them
    assert (records / "resumed.record.json").stat().st_size < 200_000
    for run in (a, resumed, spikes):
        path = records / f"{run.name}.record.json"
        assert convergence.read_loss_log(path) == convergence.read_loss_log(run)
        assert convergence.mlflow_metrics(path) == convergence.mlflow_metrics(run)

    cases = [
        ("final-val", "a", "b"),
        ("every-step", "a", "b"),
        ("resume", "a", "resumed"),
        ("spikes", "spikes"),
    ]
    for check, *runs in cases:
        folders, recs = tmp_path / f"out_{check}_f", tmp_path / f"out_{check}_r"
        as_folders = [str(tmp_path / r) for r in runs]
        as_records = [str(records / f"{r}.record.json") for r in runs]
        codes = [
            convergence.main([check, *as_folders, "--out", str(folders), "--name", "x"]),
            convergence.main([check, *as_records, "--out", str(recs), "--name", "x"]),
        ]
        from_folders = json.loads((folders / "x.json").read_text())
        from_records = json.loads((recs / "x.json").read_text())
        assert codes[0] == codes[1], check
        assert _verdict_facts(from_records) == _verdict_facts(from_folders), check
        assert (folders / "x_a_metrics.json").read_text() == (recs / "x_a_metrics.json").read_text()
    final = json.loads((tmp_path / "out_final-val_r" / "x.json").read_text())
    assert final["passed"] and final["relative_difference"] == pytest.approx(0.02 / 2.52)
    resume = json.loads((tmp_path / "out_resume_r" / "x.json").read_text())
    assert resume["verdict"] == "bitwise" and resume["resumed_after_step"] == 120
    spike = json.loads((tmp_path / "out_spikes_r" / "x.json").read_text())
    assert [s["step"] for s in spike["spikes"]] == [200] and spike["expert_load"]["logged_steps"] == 30


def test_a_broken_record_is_named(tmp_path, capsys):
    bad = tmp_path / "x.record.json"
    bad.write_text(json.dumps({"name": "x", "identity": {}, "metrics": {}}))
    code = convergence.main(["spikes", str(bad), "--out", str(tmp_path / "out")])
    assert code == 2 and f"{bad}: a run record needs train_log" in capsys.readouterr().err


# bench/convergence_runs.py with records: skipping, the corpus check, the files a call returns.


def _records_of(tracked, tmp_path, names):
    """NAME.record.json for each of ``names``, from tracked folders (inter_fp8 0.4% above the rest)."""
    records = tmp_path / "records"
    for name in names:
        scale = 1.004 if name == "inter_fp8" else 1.0
        run = tracked["make"](
            tmp_path / "folders" / name, {s: v * scale for s, v in _curve().items()}, [(300, 2.5 * scale)]
        )
        convergence.write_record(run, records / f"{name}.record.json")
    return records


# A stand-in for a run's launcher: continues from its latest checkpoint, logs STEP_CHUNK steps
# every TICK_S, saves ``latest`` at the end or at SIGTERM (as the trainer does at a step
# boundary), and notes when it ran (for the overlap of parallel runs).
FAKE_RUN = """
import json, signal, sys, time
from pathlib import Path
run, steps, chunk, tick = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
(run / "checkpoints").mkdir(parents=True, exist_ok=True)
latest = run / "checkpoints" / "latest"
step = int(latest.read_text()[5:]) if latest.is_file() else 0
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
started = time.time()
while step < steps and not stop:
    time.sleep(tick)
    step = min(steps, step + chunk)
    with open(run / "train_log.jsonl", "a") as log:
        log.write(json.dumps({"step": step}) + "\\n")
latest.write_text(f"step_{step:08d}")
with open(run / "spans.txt", "a") as spans:
    spans.write(f"{started} {time.time()} {step}\\n")
"""


def _fake_launches(monkeypatch, runs_dir, chunk: int = 2000, tick_s: float = 0.0):
    """convergence_runs with runs under ``runs_dir`` whose launcher is FAKE_RUN (``chunk`` steps
    per ``tick_s``; by default a run finishes at once) and whose SIGTERM goes to that process;
    returns the names started, in order."""
    import sys

    from bench import convergence_runs

    monkeypatch.setattr(convergence_runs, "RUNS", runs_dir)
    monkeypatch.setattr(convergence_runs, "POLL_S", 0.02)
    steps = str(convergence_runs.STEPS)
    monkeypatch.setattr(
        convergence_runs,
        "command",
        lambda name: [sys.executable, "-c", FAKE_RUN, str(runs_dir / name), steps, str(chunk), str(tick_s)],
    )
    monkeypatch.setattr(convergence_runs, "stop_ranks", lambda process: process.send_signal(15))
    started = []
    real_start = convergence_runs.start

    def start(name, stop_at_step=None, threads=None):
        started.append(name)
        return real_start(name, stop_at_step, threads)

    monkeypatch.setattr(convergence_runs, "start", start)
    return started


def _spans(run_dir) -> list[tuple[float, float, int]]:
    lines = (run_dir / "spans.txt").read_text().split("\n")
    return [(float(a), float(b), int(c)) for a, b, c in (line.split() for line in lines if line)]


def test_run_all_skips_recorded_runs_and_stops_at_six_unrecorded(monkeypatch, tmp_path, capsys):
    import time

    from bench import convergence_runs

    launched = _fake_launches(monkeypatch, tmp_path / "runs")
    names = list(convergence_runs.RUN_TABLE)
    convergence_runs.run_all(names, time.time() + 3600, recorded={"inter_bf16", "intra_fp8"})
    assert launched == [n for n in names if n not in ("inter_bf16", "intra_fp8")]
    assert convergence_runs.pending_records({"inter_bf16", "intra_fp8"}) == launched

    launched.clear()
    convergence_runs.run_all(names, time.time() + 3600)  # the same machine, nothing recorded
    assert launched == ["inter_bf16"]  # then 6 wait for their records: a 7th would not fit a call
    assert convergence_runs.pending_records(()) == [n for n in names if n != "intra_fp8"]
    assert "wait for their records to be committed first" in capsys.readouterr().out

    fresh = _fake_launches(monkeypatch, tmp_path / "fresh")
    convergence_runs.run_all(names, time.time() + 3600)
    assert fresh == names[:6]


def test_parallel_runs_overlap_and_the_resume_run_stops_then_resumes(monkeypatch, tmp_path):
    """--parallel 2: two runs at a time (their spans overlap), no third while two run;
    inter_resume is stopped by SIGTERM past step 1,000 and finished by a second start."""
    import time

    from bench import convergence_runs

    runs = tmp_path / "runs"
    started = _fake_launches(monkeypatch, runs, chunk=100, tick_s=0.05)  # 2,000 steps in ~1 s
    names = ["inter_bf16", "inter_resume", "inter_fp8"]
    convergence_runs.run_all(names, time.time() + 3600, parallel=2)
    assert started == ["inter_bf16", "inter_resume", "inter_resume", "inter_fp8"]
    assert all(convergence_runs.latest_step(n) == convergence_runs.STEPS for n in names)
    (bf16,) = _spans(runs / "inter_bf16")
    first, second = _spans(runs / "inter_resume")
    assert convergence_runs.RESUME_STOP_STEP <= first[2] < convergence_runs.STEPS  # stopped there
    assert second[2] == convergence_runs.STEPS and second[0] >= first[1]  # then resumed
    assert first[0] < bf16[1] and bf16[0] < first[1]  # side by side
    (fp8,) = _spans(runs / "inter_fp8")
    assert fp8[0] >= min(bf16[1], first[1])  # only once a slot was free

    # one at a time: no two spans overlap
    serial = tmp_path / "serial"
    _fake_launches(monkeypatch, serial, chunk=100, tick_s=0.02)
    convergence_runs.run_all(["inter_bf16", "inter_fp8"], time.time() + 3600)
    (a,), (b,) = _spans(serial / "inter_bf16"), _spans(serial / "inter_fp8")
    assert b[0] >= a[1]


def test_the_deadline_stops_every_running_run_and_starts_none_after(monkeypatch, tmp_path, capsys):
    """At the budget both running runs get SIGTERM and save where they are; with less than
    MIN_START_S left no further run starts."""
    import time

    from bench import convergence_runs

    runs = tmp_path / "runs"
    started = _fake_launches(monkeypatch, runs, chunk=1, tick_s=0.01)  # far from finishing
    monkeypatch.setattr(convergence_runs, "MIN_START_S", 1.0)  # of a 2 s budget
    convergence_runs.run_all(["inter_bf16", "inter_fp8", "intra_bf16"], time.time() + 2.0, parallel=2)
    assert started == ["inter_bf16", "inter_fp8"]
    for name in started:
        (span,) = _spans(runs / name)
        assert 0 < span[2] < convergence_runs.STEPS
        assert convergence_runs.latest_step(name) == span[2]
    out = capsys.readouterr().out
    assert "intra_bf16 wait for the next call" in out
    assert out.count("SIGTERM to the ranks at the call's budget") == 2


def test_records_of_another_corpus_are_refused(tracked, monkeypatch, tmp_path, capsys):
    from bench import convergence_runs

    records = _records_of(tracked, tmp_path, ["inter_bf16"])
    found = convergence_runs.read_records(records, tracked["manifest"])
    assert found == {"inter_bf16": records / "inter_bf16.record.json"}
    other = tmp_path / "other" / "code.manifest.json"
    other.parent.mkdir()
    other.write_text(json.dumps({"files_digest": "ab" * 32, "tokenizer": {"sha256": TOKENIZER_SHA}}))
    with pytest.raises(convergence.ConvergenceInputError) as err:
        convergence_runs.read_records(records, other)
    assert DIGEST in str(err.value) and "ab" * 32 in str(err.value) and str(other) in str(err.value)
    with pytest.raises(convergence.ConvergenceInputError, match="no corpus manifest"):
        convergence_runs.read_records(records, tmp_path / "none" / "code.manifest.json")
    assert convergence_runs.read_records(tmp_path / "no_records", other) == {}

    launched = _fake_launches(monkeypatch, tmp_path / "runs")
    monkeypatch.setenv("CORPUS_DIR", str(other.parent))
    monkeypatch.setenv("PYTHONPATH", "")
    argv = ["--skip-corpus", "--records", str(records), "--out", str(tmp_path / "out")]
    assert convergence_runs.main(argv) == 2
    assert "ab" * 32 in capsys.readouterr().err and launched == []


def test_collect_checks_records_and_returns_two_files(tracked, monkeypatch, tmp_path):
    import matplotlib.image

    from bench import convergence_runs

    records = _records_of(tracked, tmp_path, ["inter_bf16", "inter_fp8", "inter_resume", "intra_moe"])
    monkeypatch.setattr(convergence_runs, "RUNS", tmp_path / "runs")
    found = convergence_runs.read_records(records, tracked["manifest"])
    out = tmp_path / "out"
    summary = convergence_runs.collect(out, found)
    assert sorted(p.name for p in out.iterdir()) == ["convergence_checks.json", "convergence_checks.png"]
    assert json.loads((out / "convergence_checks.json").read_text()) == summary
    checks = summary["checks"]
    fp8 = checks["inter_fp8_vs_bf16"]
    assert fp8["passed"] and fp8["relative_difference"] == pytest.approx(0.004 / 1.0, rel=1e-9)
    assert fp8["plot"] == "convergence_checks.png, panel 1"
    assert checks["inter_resume_vs_uninterrupted"]["verdict"] == "bitwise"
    assert checks["intra_moe_spikes"]["passed"] and checks["intra_moe_spikes"]["plot"].endswith("panel 3")
    assert checks["intra_fp8_vs_bf16"] == {"check": "final-val", "waits_for": ["intra_fp8", "intra_bf16"]}
    assert checks["inter_graphs_vs_eager"]["waits_for"] == ["inter_graphs"]
    assert summary["runs"]["inter_fp8"] == "record"
    assert summary["runs"]["inter_graphs"] == "checkpoint step 0 of 2000"
    panels = [
        matplotlib.image.imread(tmp_path / "runs" / "checks" / f"{label}.png").shape
        for label in ("inter_fp8_vs_bf16", "inter_resume_vs_uninterrupted", "intra_moe_spikes")
    ]
    stacked = matplotlib.image.imread(out / "convergence_checks.png").shape
    assert stacked[:2] == (sum(p[0] for p in panels), max(p[1] for p in panels))


def test_parallel_below_one_is_refused_before_anything_runs(capsys):
    from bench import convergence_runs

    with pytest.raises(SystemExit) as done:
        convergence_runs.main(["--parallel", "0", "--skip-corpus"])
    assert done.value.code == 2
    assert "--parallel 0: at least one run at a time" in capsys.readouterr().err
