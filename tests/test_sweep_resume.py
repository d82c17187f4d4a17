"""A sweep continued after a stop: finished runs known by their checkpoints or by the MLflow
store (whose checkpoints may be gone), a local sweep within a time budget (``--stop-after``),
and ``scaling compare`` / ``fit`` counting a run that was run again once.

The launcher runs stand-in trainer entries (``HM_TRAIN_ENTRY``) except in the ``long`` test,
which runs the real trainer through a stop, a lost checkpoint folder and a rerun.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from hybrid_megatron.launch import cli
from tests.test_launcher import (
    _ckpt,
    _fake_checkpoint,
    _mini_sweep,
    _use_standin,
    run_sweep_skipping_the_first,
)

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- stand-in entry


def saving_entry(recipe):
    """Like the trainer under a stop signal: "trains" a step every 0.05 s from its latest
    checkpoint up to one short of its last (then waits; at most 60 s in all); on SIGTERM writes
    a checkpoint at the step reached and returns."""
    from hybrid_megatron.accounting import count_parameters
    from hybrid_megatron.checkpoint_layout import checkpoint_step, latest_checkpoint
    from hybrid_megatron.config import derived
    from tests.test_launcher import _fake_checkpoint

    last = derived(recipe, 1, count_parameters)["total_steps"] - 1

    stop = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    out = Path(recipe.run_dir) / "standin"
    out.mkdir(parents=True, exist_ok=True)
    (out / "started").write_text("")
    latest = latest_checkpoint(recipe.checkpoint.dir)
    step = checkpoint_step(latest) if latest else 0
    deadline = time.time() + 60
    while not stop and time.time() < deadline:
        time.sleep(0.05)
        step = min(step + 1, last)
    if stop:
        _fake_checkpoint(Path(recipe.checkpoint.dir), step)
    return {"stopped_by_signal": stop[0] if stop else None, "steps": step}


# ---------------------------------------------------------------------------- helpers


def _sweep_recipes(tmp_path, overrides: str = "train.warmup_steps=1"):
    """The mini sweep (transformer_tiny, mamba_tiny at 10K tokens): its file, runs, recipes and
    each run's total steps at one rank."""
    from hybrid_megatron.accounting import count_parameters
    from hybrid_megatron.config import derived, load_recipe
    from hybrid_megatron.scaling.sweep import load_sweep

    sweep = _mini_sweep(tmp_path, overrides)
    _, runs = load_sweep(sweep, (_ckpt(tmp_path),))
    recipes = [load_recipe(run.recipe_path, run.overrides) for run in runs]
    totals = [derived(recipe, 1, count_parameters)["total_steps"] for recipe in recipes]
    return sweep, runs, recipes, totals


def _log_run(uri, experiment, name, group, steps, status, loss=5.0, params=None):
    """An MLflow run as the trainer logs one: its name, tag hm.compare_group, ``train/loss`` at
    steps 1..``steps``, ``status`` (None: left RUNNING). Returns its id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from hybrid_megatron.tracking.store import open_store

    client, experiment_id = open_store(uri, experiment)
    tags = {"hm.compare_group": group or "", "hm.kind": "transformer"}
    run = client.create_run(experiment_id, tags=tags, run_name=name)
    metrics = [Metric("train/loss", loss + 1.0 / s, 0, s) for s in range(1, steps + 1)]
    metrics.append(Metric("val/loss", loss, 0, steps))
    client.log_batch(
        run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in (params or {}).items()]
    )
    if status is not None:
        MlflowClient(uri).set_terminated(run.info.run_id, status)
    time.sleep(0.01)  # end times in the order the runs were logged
    return run.info.run_id


# ---------------------------------------------------------------------------- finished in the store


def test_finished_in_the_store_needs_status_finished_and_the_last_step(tmp_path):
    """Only a FINISHED run of the name and group that logged exactly the last step counts; of
    two, the later. A missing database is no runs and is not created; a deleted run is gone."""
    from mlflow.tracking import MlflowClient

    from hybrid_megatron.tracking.finished import FinishedRuns

    uri, exp = f"sqlite:///{tmp_path}/mlruns.db", "sweeps"
    assert FinishedRuns(uri, exp).runs == [] and not (tmp_path / "mlruns.db").exists()
    for status in (None, "KILLED", "FAILED"):  # stopped or crashed after logging every step
        _log_run(uri, exp, "a", "g", 8, status)
    _log_run(uri, exp, "a", "g", 7, "FINISHED")  # one step short
    _log_run(uri, exp, "a", "g", 9, "FINISHED")  # a longer run of that name (another budget)
    _log_run(uri, exp, "a", "other", 8, "FINISHED")  # another sweep's run of that name
    _log_run(uri, exp, "a", None, 8, "FINISHED")  # no group
    assert FinishedRuns(uri, exp).reached("a", "g", 8) is None
    assert FinishedRuns(uri, "nope").runs == []
    first = _log_run(uri, exp, "a", "g", 8, "FINISHED")
    second = _log_run(uri, exp, "a", "g", 8, "FINISHED")  # finished twice
    runs = FinishedRuns(uri, exp)
    assert len(runs.runs) == 6  # the FINISHED ones only
    assert runs.reached("a", "g", 8) == second
    assert runs.reached("a", "g", 7) is not None and runs.reached("a", "g", 6) is None
    assert runs.reached("a", None, 8) not in (None, first, second)
    assert runs.reached("b", "g", 8) is None
    assert runs.last_step(second) == 8
    MlflowClient(uri).delete_run(second)
    assert FinishedRuns(uri, exp).reached("a", "g", 8) == first


def test_finished_evidence_checkpoint_first_then_store(tmp_path):
    from hybrid_megatron.launch.sweep import finished_evidence

    _, runs, recipes, totals = _sweep_recipes(tmp_path)
    recipe, total = recipes[0], totals[0]
    uri, exp = recipe.tracking_uri(), recipe.tracking.experiment
    assert uri == f"sqlite:///{tmp_path}/runs/mini/mlruns.db"
    assert finished_evidence(recipe, 1) is None
    killed = _log_run(uri, exp, runs[0].name, "mini", total, "KILLED")
    assert finished_evidence(recipe, 1) is None
    done = _log_run(uri, exp, runs[0].name, "mini", total, "FINISHED")
    assert killed != done
    assert finished_evidence(recipe, 1) == f"MLflow run {done} at step {total}"
    off = recipe.model_copy(update={"tracking": recipe.tracking.model_copy(update={"enabled": False})})
    assert finished_evidence(off, 1) is None
    _fake_checkpoint(Path(recipe.checkpoint.dir), total)
    assert finished_evidence(recipe, 1) == f"checkpoint at step {total}"
    # the other run's store entry does not count for it
    assert finished_evidence(recipes[1], 1) is None


def test_sweep_skips_the_run_the_store_holds_finished_and_runs_the_killed_one(tmp_path, monkeypatch, capsys):
    """No checkpoints (a fresh machine), only the sweep's MLflow store: run A finished (twice,
    and once killed), run B was killed at its last step and finished one step short in a
    store entry: A is skipped naming its latest finished MLflow run, B runs."""
    sweep, runs, recipes, totals = _sweep_recipes(tmp_path)
    uri, exp = recipes[0].tracking_uri(), recipes[0].tracking.experiment
    a, b = runs[0].name, runs[1].name
    _log_run(uri, exp, a, "mini", totals[0] // 2, "KILLED")
    _log_run(uri, exp, a, "mini", totals[0], "FINISHED")
    latest = _log_run(uri, exp, a, "mini", totals[0], "FINISHED")
    _log_run(uri, exp, b, "mini", totals[1], "KILLED")
    _log_run(uri, exp, b, "mini", totals[1] - 1, "FINISHED")
    _log_run(uri, exp, b, "other", totals[1], "FINISHED")
    out = run_sweep_skipping_the_first(sweep, tmp_path, monkeypatch, capsys, recipes, b)
    assert f"[sweep] 1 runs finished earlier, skipped: {a} (MLflow run {latest} at step {totals[0]})\n" in out


def test_an_unreadable_store_leaves_the_checkpoints_as_evidence(tmp_path, monkeypatch, capsys):
    sweep, runs, recipes, totals = _sweep_recipes(tmp_path)
    database = Path(recipes[0].tracking_uri().removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True)
    database.write_text("not a database")
    _fake_checkpoint(Path(recipes[0].checkpoint.dir), totals[0])
    from hybrid_megatron.launch.sweep import _skip_finished

    todo, _ = _skip_finished(runs, recipes, lambda recipe: 1)
    out = capsys.readouterr().out
    assert [run.name for run in todo] == [runs[1].name]
    assert out.count(f"tracking store {recipes[0].tracking_uri()} not read") == 1
    assert f"skipped: {runs[0].name} (checkpoint at step {totals[0]})" in out


# ---------------------------------------------------------------------------- --stop-after


def test_stop_after_signals_the_running_run_and_lists_what_is_left(tmp_path, monkeypatch, capsys):
    """At the budget the running run gets SIGTERM, saves at the step it reached and returns;
    the next run does not start; the launcher names both runs left, exit 3. Run again without
    a budget, the first run resumes from that checkpoint."""
    sweep, runs, recipes, totals = _sweep_recipes(tmp_path)
    _use_standin(monkeypatch, "standin_entry")  # the ranks' PYTHONPATH
    monkeypatch.setenv("HM_TRAIN_ENTRY", f"{__name__}:saving_entry")
    args = [str(sweep), "--sweep", "--local", "--nproc", "1", _ckpt(tmp_path)]
    started = time.monotonic()
    code = cli.main([*args, "--stop-after", "8", "--start-margin", "0"])
    took = time.monotonic() - started
    out = capsys.readouterr().out
    assert code == 3, out
    assert 8 <= took < 60, out
    assert "[launch] time budget reached: asking job" in out
    from hybrid_megatron.checkpoint_layout import checkpoint_step, latest_checkpoint

    latest = latest_checkpoint(recipes[0].checkpoint.dir)
    assert latest is not None
    saved = checkpoint_step(latest)
    assert 0 < saved < totals[0]
    assert "[sweep] 0/0 runs succeeded (compare group mini)" in out
    assert (
        f"[sweep] stopped by --stop-after 8: 2 of 2 runs left to do: {runs[0].name} (resumes at "
        f"step {saved}), {runs[1].name} (from step 0); run the same command again to continue"
    ) in out
    assert not (Path(recipes[1].run_dir) / "standin").exists()  # never started

    # too little time left for any run: none starts
    code = cli.main([*args, "--stop-after", "30", "--start-margin", "40"])
    out = capsys.readouterr().out
    assert code == 3 and "less than --start-margin 40: no run starts" in out
    assert "2 of 2 runs left to do" in out and latest_checkpoint(recipes[0].checkpoint.dir) == latest


def test_stop_after_needs_a_local_sweep(tmp_path, capsys):
    sweep = _mini_sweep(tmp_path)
    assert cli.main([str(sweep), "--sweep", "--stop-after", "60", _ckpt(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --stop-after applies to --sweep --local runs only")
    assert cli.main([str(REPO / "recipes" / "transformer_tiny.yaml"), "--local", "--stop-after", "6"]) == 2
    assert "--stop-after applies to --sweep --local runs only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([str(sweep), "--sweep", "--local", "--stop-after", "-1"])
    assert "'-1' is not a number of seconds" in capsys.readouterr().err


# ---------------------------------------------------------------------------- scaling compare / fit


def test_a_run_run_again_counts_once_from_its_finished_run(tmp_path, capsys):
    """Two MLflow runs of one name (killed, then finished from scratch) and one finished twice
    count once each, with the latest finished run's loss, in compare and in the fit's runs."""
    from hybrid_megatron.scaling.__main__ import main
    from hybrid_megatron.scaling.runs import load_runs

    uri, exp = f"sqlite:///{tmp_path}/mlruns.db", "sweeps"

    def params(kind_n):
        return {"model.num_parameters": str(kind_n), "train.tokens": "20000", "train.flops": "1.2e11"}

    _log_run(uri, exp, "g-a", "g", 4, "KILLED", loss=9.0, params=params(1000000))
    a = _log_run(uri, exp, "g-a", "g", 8, "FINISHED", loss=5.1, params=params(1000000))
    _log_run(uri, exp, "g-b", "g", 8, "FINISHED", loss=7.0, params=params(1100000))
    b = _log_run(uri, exp, "g-b", "g", 8, "FINISHED", loss=5.0, params=params(1100000))
    c = _log_run(uri, exp, "g-b", "h", 8, "FINISHED", loss=4.0, params=params(1100000))  # other group
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    client.set_tag(b, "hm.kind", "inter")
    client.set_tag(c, "hm.kind", "inter")
    runs = load_runs(uri, exp, "g", min_runs=1)
    assert {k: (v.run_ids, list(v.loss)) for k, v in runs.items()} == {
        "inter": ([b], [5.0]),
        "transformer": ([a], [5.1]),
    }
    every = load_runs(uri, exp, None, min_runs=1)  # the whole experiment: one per name and group
    assert sorted(every["inter"].run_ids) == sorted([b, c]) and every["transformer"].run_ids == [a]
    code = main(
        ["compare", "--tracking-uri", uri, "--experiment", exp, "--group", "g", "--out", str(tmp_path / "c")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[2].split() == ["1.200e+11", "5.1000", "5.0000*"]
    table = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert table["rows"][0]["run_ids"] == {"transformer": [a], "inter": [b]}


# ---------------------------------------------------------------------------- the real trainer


@pytest.mark.long  # the real trainer: a run stopped at the budget, resumed, then its checkpoints lost
def test_real_sweep_stopped_by_the_budget_resumes_then_is_known_from_the_store(tmp_path, monkeypatch, capsys):
    """The first run of a real two-run sweep is stopped by --stop-after after a few steps: it
    saves at the step it reached and its MLflow run ends KILLED. Run again, it resumes from that
    checkpoint (every step logged once) and finishes, its MLflow run FINISHED at the last step,
    then the second run finishes. With every checkpoint folder removed (a fresh machine), the
    sweep skips both runs, known from the store."""
    import shutil

    from mlflow.tracking import MlflowClient

    from hybrid_megatron.checkpoint_layout import checkpoint_step, latest_checkpoint
    from hybrid_megatron.tracking.finished import FinishedRuns
    from tests.training_helpers import read_losses

    monkeypatch.delenv("HM_TRAIN_ENTRY", raising=False)
    overrides = (
        "train.warmup_steps=1, model.num_layers=2, data.seq_length=64, train.global_batch_size=4, "
        "train.log_interval=1, train.eval_interval=0, checkpoint.interval=1000"
    )
    sweep, runs, recipes, totals = _sweep_recipes(tmp_path, overrides)
    assert totals[0] == 40  # the sweep's 10K tokens in steps of 4 x 64
    args = [str(sweep), "--sweep", "--local", "--nproc", "1", _ckpt(tmp_path), "data.num_workers=0"]
    first = Path(recipes[0].run_dir)

    class Clock:
        """The launcher's clock reaches the deadline once the first run has logged 5 steps."""

        @staticmethod
        def monotonic() -> float:
            log = first / "train_log.jsonl"
            late = log.exists() and len(log.read_text().splitlines()) >= 5
            return time.monotonic() + (1e9 if late else 0.0)

    with monkeypatch.context() as patch:
        patch.setattr("hybrid_megatron.launch.local.time", Clock)
        code = cli.main([*args, "--stop-after", "100000", "--start-margin", "0"])
    out = capsys.readouterr().out
    assert code == 3, out
    saved = checkpoint_step(latest_checkpoint(recipes[0].checkpoint.dir))
    assert 5 <= saved < totals[0], out
    assert sorted(read_losses(first)) == list(range(1, saved + 1))
    assert f"{runs[0].name} (resumes at step {saved}), {runs[1].name} (from step 0)" in out
    uri, exp = recipes[0].tracking_uri(), recipes[0].tracking.experiment
    client = MlflowClient(uri)
    run_id = (first / "checkpoints" / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    assert FinishedRuns(uri, exp).reached(runs[0].name, "mini", totals[0]) is None

    code = cli.main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[sweep] 2/2 runs succeeded (compare group mini)" in out
    steps = [json.loads(line)["step"] for line in (first / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, totals[0] + 1))  # resumed at the saved step, not started over
    assert client.get_run(run_id).info.status == "FINISHED"
    assert FinishedRuns(uri, exp).reached(runs[0].name, "mini", totals[0]) == run_id

    for recipe in recipes:
        shutil.rmtree(recipe.checkpoint.dir)
    code = cli.main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(
        rf"\[sweep\] 2 runs finished earlier, skipped: {runs[0].name} \(MLflow run {run_id} at step "
        rf"{totals[0]}\), {runs[1].name} \(MLflow run \w+ at step {totals[1]}\)\n",
        out,
    ), out
    assert "[sweep] 0/0 runs succeeded" in out
