"""Sweep expansion: P- and F-matched token budgets, tags, the shipped sweep files, and a sweep
run as one job array on the test SLURM cluster with its MLflow runs read back."""

from __future__ import annotations

import json

import pytest
import yaml

from hybrid_megatron.accounting import model_flops_per_token
from hybrid_megatron.config import load_recipe
from hybrid_megatron.config.errors import RecipeError
from hybrid_megatron.launch import cli
from hybrid_megatron.scaling.sweep import format_sweep_table, load_sweep
from tests.training_helpers import REPO

SWEEPS = REPO / "recipes" / "sweeps"


def test_f_matched_runs_spend_the_reference_flops():
    spec, runs = load_sweep(SWEEPS / "tiny_F.yaml")
    assert len(runs) == 6 and spec.match == "F"
    by_budget = {}
    for run in runs:
        recipe = load_recipe(run.recipe_path, run.overrides)
        assert recipe.train.tokens == run.tokens and recipe.tracking.compare_group == "tiny-F"
        assert recipe.tracking.match == "F" and recipe.name == run.name
        per_token = model_flops_per_token(recipe.model, recipe.data.seq_length)
        by_budget.setdefault(run.name.rsplit("-", 1)[1], []).append(per_token * recipe.train.tokens)
    for flops in by_budget.values():  # equal compute within rounding of one token
        assert max(flops) / min(flops) == pytest.approx(1.0, abs=1e-4)
    ref = [r for r in runs if "transformer_tiny" in r.name]
    assert sorted(r.tokens for r in ref) == [20_000, 40_000]
    inter = {r.name.rsplit("-", 1)[1]: r.tokens for r in runs if "inter_tiny" in r.name}
    assert inter["40K"] in (2 * inter["20K"] - 1, 2 * inter["20K"], 2 * inter["20K"] + 1)


def test_p_matched_paper_sweep_table():
    spec, runs = load_sweep(SWEEPS / "paper_1b_P.yaml")
    assert {r.tokens for r in runs} == {102_000_000_000}
    assert [r.kind for r in runs] == ["transformer", "swa", "mamba", "inter", "intra"]
    table = format_sweep_table(spec, runs)
    assert "paper-1b-P-inter_1b-102B" in table and "102,000,000,000" in table
    # parameter-matched: the five 1B models within 10% of each other
    params = [r.params for r in runs]
    assert max(params) / min(params) < 1.10


def test_paper_f_sweep_gives_inter_more_tokens():
    _, runs = load_sweep(SWEEPS / "paper_1b_F.yaml")
    tokens = {r.kind: r.tokens for r in runs}
    assert tokens["transformer"] == 102_000_000_000
    assert tokens["inter"] > tokens["transformer"] and tokens["mamba"] > tokens["transformer"]


def test_bad_sweep_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "sweep: {name: x, match: F, reference: nope, tokens: [1M], recipes: ["
        f"{REPO}/recipes/transformer_tiny.yaml]}}\n"
    )
    with pytest.raises(RecipeError, match="sweep.reference: 'nope' is not one of"):
        load_sweep(bad)
    bad.write_text("sweep: {name: x, match: Q, tokens: [1M], recipes: [a.yaml]}\n")
    with pytest.raises(RecipeError, match="sweep.match"):
        load_sweep(bad)


@pytest.mark.slow  # two array tasks, each one SLURM task running the real trainer
def test_sweep_runs_as_one_slurm_job_array_with_f_matched_budgets(
    slurm_cluster, tmp_path, monkeypatch, capsys
):
    """A two-run F-matched sweep (Transformer reference, intra hybrid) submitted to the test
    SLURM cluster as one job array and followed with ``--wait``: each array task trains its
    kind for its own token budget, and both MLflow runs carry the sweep's compare group
    (SQLite store under tmp_path, created by the launcher before the tasks start)."""
    import math
    import subprocess

    import mlflow

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "sweep: {name: mini-F, match: F, reference: transformer_tiny, tokens: [2048], overrides: ["
        "model.num_layers=2, data.seq_length=64, train.global_batch_size=4, train.warmup_steps=1, "
        "train.eval_interval=0, train.log_interval=1, checkpoint.interval=1000], recipes: ["
        f"{REPO}/recipes/transformer_tiny.yaml, {REPO}/recipes/intra_tiny.yaml]}}\n"
    )
    extra = (f"checkpoint.dir={tmp_path}/runs/base/checkpoints",)
    _, runs = load_sweep(sweep, extra)
    # F-matched: the hybrid's budget is the reference's FLOPs over its own FLOPs per token.
    per_token = {
        r.kind: model_flops_per_token(load_recipe(r.recipe_path, r.overrides).model, 64) for r in runs
    }
    budgets = {"transformer": 2048, "intra": round(2048 * per_token["transformer"] / per_token["intra"])}
    assert [r.tokens for r in runs] == [budgets["transformer"], budgets["intra"]]
    steps = {kind: math.ceil(tokens / 256) for kind, tokens in budgets.items()}  # 4 x 64 tokens a step
    assert steps == {"transformer": 8, "intra": 7}  # the hybrid costs more per token: fewer steps

    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.delenv("HM_TRAIN_ENTRY", raising=False)
    code = cli.main(
        [
            str(sweep),
            "--sweep",
            "--wait",
            *extra,
            f"slurm.partition={slurm_cluster.partition}",
            "slurm.time=10",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    array_id = next(
        line.split()[4] for line in out.splitlines() if line.startswith("[sweep] submitted job array")
    )
    assert f"[sweep] submitted job array {array_id} with 2 runs (compare group mini-F)" in out
    assert "[sweep] 2/2 runs succeeded (compare group mini-F)" in out
    state = subprocess.run(
        ["scontrol", "show", "job", array_id],
        capture_output=True,
        text=True,
        env=slurm_cluster.env,
        timeout=30,
    ).stdout
    for task in (0, 1):  # one array, one task per run, both done
        assert f"ArrayJobId={array_id} ArrayTaskId={task}" in state, state
    assert state.count("JobState=COMPLETED") == 2, state

    for task, run in enumerate(runs):
        run_dir = tmp_path / "runs" / "mini-F" / run.name
        logged = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        assert logged == list(range(1, steps[run.kind] + 1)), (run.name, logged)
        saved = yaml.safe_load(
            (run_dir / "checkpoints" / f"step_{steps[run.kind]:08d}" / "recipe.yaml").read_text()
        )
        assert (saved["name"], saved["model"]["kind"], saved["train"]["tokens"]) == (
            run.name,
            run.kind,
            run.tokens,
        )
        # The array task that ran it (submitit's logs of the whole array sit in the first run's dir).
        log = (
            tmp_path
            / "runs"
            / "mini-F"
            / runs[0].name
            / "slurm"
            / f"{array_id}_{task}"
            / f"{array_id}_{task}_0_log.out"
        ).read_text()
        assert f"budget    {steps[run.kind]} steps, {steps[run.kind] * 256:,} tokens" in log
        assert ("layers    AA" if run.kind == "transformer" else "layers    MH") in log

    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/runs/mini-F/mlruns.db")
    try:
        found = mlflow.search_runs(experiment_names=["hybrid_megatron-tiny"])
        experiment = mlflow.get_experiment_by_name("hybrid_megatron-tiny")
    finally:
        mlflow.set_tracking_uri(previous_uri)
    assert sorted(found["tags.mlflow.runName"]) == sorted(r.name for r in runs)
    assert set(found["tags.hm.compare_group"]) == {"mini-F"} and set(found["tags.hm.match"]) == {"F"}
    assert set(found["status"]) == {"FINISHED"}
    for _, row in found.iterrows():
        kind = row["tags.hm.kind"]
        assert row["params.model.kind"] == kind
        assert int(row["params.train.tokens"]) == steps[kind] * 256  # planned: whole steps
        assert row["metrics.train/tokens_seen"] == steps[kind] * 256
    assert experiment.artifact_location.endswith(f"{tmp_path}/runs/mini-F/mlartifacts")  # not the jobs' cwd
    assert len(list((tmp_path / "runs" / "mini-F" / "mlartifacts").rglob("loss_curve.png"))) == 2
