"""Scaling laws: known laws recovered, isoFLOP exponents, clear errors, CLI on a local MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# Two kinds with different known laws (the first is Chinchilla's fit).
LAWS = {
    "transformer": dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "mamba": dict(E=1.85, A=250.0, B=900.0, alpha=0.30, beta=0.36),
}
FLOPS_RATIO = {"transformer": 1.15, "mamba": 1.05}  # the runs' own FLOPs / 6ND


def _loss(law: dict, n, d):
    n, d = np.asarray(n), np.asarray(d)
    return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]


def _optimal_n(law: dict, c):
    a = law["beta"] / (law["alpha"] + law["beta"])
    g = (law["alpha"] * law["A"] / (law["beta"] * law["B"])) ** (1 / (law["alpha"] + law["beta"]))
    return g * (np.asarray(c) / 6) ** a


def _grid_runs(law: dict, noise: float, seed: int):
    """6 sizes x 5 token counts, multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    n = np.repeat(np.logspace(7, 9, 6), 5)
    d = np.tile(np.logspace(9, 11, 5), 6)
    return n, d, _loss(law, n, d) * np.exp(rng.normal(0, noise, n.shape))


def _isoflop_runs(law: dict, budgets, sizes: int, noise: float, seed: int):
    """Per budget C (=6ND), ``sizes`` models spread x/÷ 4 around 1.5x the true optimum."""
    rng = np.random.default_rng(seed)
    n, d = [], []
    for c in budgets:
        for s in np.logspace(-0.6, 0.6, sizes) * 1.5 * _optimal_n(law, c):
            n.append(s)
            d.append(c / (6 * s))
    n, d = np.array(n), np.array(d)
    return n, d, _loss(law, n, d) * np.exp(rng.normal(0, noise, n.shape))


@pytest.mark.parametrize("kind", sorted(LAWS))
def test_fit_recovers_known_law(kind):
    from hybrid_megatron.scaling.fit import fit_law

    law = LAWS[kind]
    n, d, loss = _grid_runs(law, noise=0.002, seed=1)
    fit = fit_law(n, d, loss)
    assert fit.alpha == pytest.approx(law["alpha"], abs=0.05)
    assert fit.beta == pytest.approx(law["beta"], abs=0.05)
    assert fit.E == pytest.approx(law["E"], rel=0.03)
    true_a = law["beta"] / (law["alpha"] + law["beta"])
    assert fit.a == pytest.approx(true_a, abs=0.05) and fit.b == pytest.approx(1 - true_a, abs=0.05)
    # The fitted law reproduces the noiseless losses to ~ the noise level.
    assert np.max(np.abs(fit.predict(n, d) / _loss(law, n, d) - 1)) < 0.01
    assert fit.n_runs == 30 and fit.objective > 0


def test_fit_exact_without_noise():
    from hybrid_megatron.scaling.fit import fit_law

    law = LAWS["mamba"]
    n, d, loss = _grid_runs(law, noise=0.0, seed=0)
    fit = fit_law(n, d, loss)
    for key in ("E", "alpha", "beta"):
        assert getattr(fit, key) == pytest.approx(law[key], rel=2e-3), key


def test_closed_form_allocation_minimises_loss_at_fixed_compute():
    """N*(C) = G (C/6)^a agrees with a numerical minimisation of L(N, C/(6N))."""
    from scipy.optimize import minimize_scalar

    from hybrid_megatron.scaling.fit import LawFit

    fit = LawFit(**LAWS["mamba"], objective=0.0, n_runs=0)
    for c in (1e18, 1e21, 1e24):
        res = minimize_scalar(
            lambda x, c=c: float(fit.predict(np.exp(x), c / (6 * np.exp(x)))),
            bounds=(5, 40),
            method="bounded",
            options={"xatol": 1e-10},
        )
        assert float(fit.optimal_n(c)) == pytest.approx(np.exp(res.x), rel=1e-4)
        assert float(fit.optimal_n(c) * fit.optimal_d(c)) == pytest.approx(c / 6, rel=1e-12)
    assert fit.a + fit.b == pytest.approx(1.0)
    assert fit.a == pytest.approx(0.36 / 0.66)


def test_bootstrap_intervals_contain_truth_and_shrink_with_noise():
    from hybrid_megatron.scaling.fit import bootstrap_law, fit_law

    law = LAWS["transformer"]
    widths = {}
    for noise in (0.002, 0.01):
        n, d, loss = _grid_runs(law, noise=noise, seed=3)
        fit = fit_law(n, d, loss, starts=8)
        boot = bootstrap_law(n, d, loss, fit, samples=12, seed=0)
        assert boot.samples == 12 and boot.level == 0.95
        lo, hi = boot.intervals["alpha"]
        widths[noise] = hi - lo
        if noise == 0.002:
            for key in ("alpha", "beta"):
                lo, hi = boot.intervals[key]
                assert lo - 0.01 <= law[key] <= hi + 0.01, (key, lo, hi)
    assert 0 < widths[0.002] < widths[0.01]


def test_isoflop_recovers_known_exponent():
    from hybrid_megatron.scaling.isoflop import fit_isoflop

    law = LAWS["transformer"]
    budgets = [1e18, 1e19, 1e20, 1e21]
    n, d, loss = _isoflop_runs(law, budgets, sizes=7, noise=0.0005, seed=2)
    c = 6 * n * d * 1.15 * np.exp(np.random.default_rng(0).uniform(-0.01, 0.01, n.shape))
    ids = [f"r{i}" for i in range(len(n))]
    iso = fit_isoflop(ids, n, c, loss)
    assert len(iso.budgets) == 4 and iso.used_budgets == 4
    assert iso.exponent == pytest.approx(law["beta"] / (law["alpha"] + law["beta"]), abs=0.03)
    assert iso.exponent_stderr is not None and iso.exponent_stderr < 0.02
    for b, budget in zip(iso.budgets, budgets):  # vertices within x/÷ 1.6 of the true optimum
        assert b.flops == pytest.approx(budget * 1.15, rel=0.02)
        assert abs(np.log(b.n_opt / _optimal_n(law, budget))) < np.log(1.6)


def test_isoflop_budget_grouping_and_unusable_budgets():
    from hybrid_megatron.scaling.isoflop import fit_isoflop, group_budgets

    groups = group_budgets([1e18, 1.02e18, 0.99e18, 1e19, 1.04e19, 5e19])
    assert [sorted(g.tolist()) for g in groups] == [[0, 1, 2], [3, 4], [5]]
    # A budget whose losses fall monotonically has its vertex outside the sizes: not used.
    n = np.array([1e7, 2e7, 4e7, 1e8, 2e8, 4e8])
    iso = fit_isoflop([f"r{i}" for i in range(6)], n, np.full(6, 1e18), 3.0 - 0.1 * np.log(n))
    assert len(iso.budgets) == 1 and not iso.budgets[0].used
    assert iso.budgets[0].note and iso.exponent is None


def test_too_few_runs_and_missing_fields_name_the_runs():
    import pandas as pd

    from hybrid_megatron.scaling.runs import RunPoint, RunsError, group_by_kind, points_from_frame

    points = [RunPoint(f"t{i}", "transformer", 1e8, 1e9, 6e17, 3.0) for i in range(5)]
    points += [RunPoint(f"m{i}", "mamba", 1e8, 1e9, 6e17, 3.0) for i in range(3)]
    with pytest.raises(RunsError, match=r"(?s)at least 5.*mamba: 3 run\(s\) \(m0, m1, m2\)"):
        group_by_kind(points)
    assert list(group_by_kind(points, min_runs=3)) == ["mamba", "transformer"]

    frame = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "params.model.num_parameters": ["1e8", None, "2e8"],
            "params.train.tokens": ["1e9", "1e9", "abc"],
            "params.train.flops": ["6e17", "6e17", "6e17"],
            "metrics.val/loss": [3.0, np.nan, 2.9],
            "tags.hm.kind": ["mamba", "mamba", "mamba"],
        }
    )
    with pytest.raises(RunsError) as err:
        points_from_frame(frame)
    text = str(err.value)
    assert "model.num_parameters: missing or invalid in run(s) b" in text
    assert "val/loss: missing or invalid in run(s) b" in text
    assert "train.tokens: missing or invalid in run(s) c" in text
    assert "run(s) a" not in text


def test_a_variant_is_compared_as_a_kind_of_its_own():
    """Runs tagged ``hm.variant`` (an ablation of one kind, e.g. MoE against dense) form their own
    column ``<kind>-<variant>`` in the comparison; untagged runs keep their kind."""
    import pandas as pd

    from hybrid_megatron.scaling.compare import comparison_of_frame
    from hybrid_megatron.scaling.runs import points_from_frame

    frame = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "params.model.num_parameters": ["3e7", "3e7", "3e7"],
            "params.train.tokens": ["1e9", "1e9", "1e9"],
            "params.train.flops": ["1.8e17", "1.8e17", "1.8e17"],
            "metrics.val/loss": [3.0, 2.9, 3.1],
            "tags.hm.kind": ["inter", "inter", "mamba"],
            "tags.hm.variant": ["", "moe", None],
        }
    )
    assert [p.kind for p in points_from_frame(frame)] == ["inter", "inter-moe", "mamba"]
    table = comparison_of_frame(frame)
    assert table.kinds == ["mamba", "inter", "inter-moe"]  # the paper's order, variants after their kind
    (row,) = table.rows
    assert row.losses == {"inter": 3.0, "inter-moe": 2.9, "mamba": 3.1} and row.best == "inter-moe"


def test_n_is_the_non_embedding_count_when_every_run_logged_it():
    """N of the fit: ``model.non_embedding_parameters`` where every run has it (small models'
    embeddings would dominate the total), else every run's total, never a mix."""
    import pandas as pd

    from hybrid_megatron.scaling.runs import n_parameter, points_from_frame

    frame = pd.DataFrame(
        {
            "run_id": ["a", "b"],
            "params.model.num_parameters": ["3e7", "5e7"],
            "params.model.non_embedding_parameters": ["1e7", "3e7"],
            "params.train.tokens": ["1e9", "1e9"],
            "params.train.flops": ["6e16", "1.8e17"],
            "metrics.val/loss": [3.0, 2.9],
            "tags.hm.kind": ["mamba", "mamba"],
        }
    )
    assert n_parameter(frame) == "model.non_embedding_parameters"
    assert [p.n for p in points_from_frame(frame)] == [1e7, 3e7]
    older = frame.assign(**{"params.model.non_embedding_parameters": ["1e7", None]})
    assert n_parameter(older) == "model.num_parameters"
    assert [p.n for p in points_from_frame(older)] == [3e7, 5e7]
    assert [p.n for p in points_from_frame(frame.drop(columns="params.model.non_embedding_parameters"))] == [
        3e7,
        5e7,
    ]


# --- CLI against a local MLflow store -----------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A sqlite MLflow store with experiment "sweep": 2 kinds x 4 budgets x 6 sizes from
    the known laws (group "g1"), plus runs that must be ignored: another group, one unfinished;
    and experiment "broken" with runs lacking val/loss or hm.kind."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    client = MlflowClient(uri)

    def log_run(exp, kind, n, d, c, loss, group="g1", finish=True, skip=()):
        run = client.create_run(exp, tags={"hm.compare_group": group})
        params = {
            "model.num_parameters": str(int(n)),
            "train.tokens": str(int(d)),
            "train.flops": repr(float(c)),
        }
        tags = [RunTag("hm.kind", kind)] if "kind" not in skip else []
        metrics = (
            []
            if "loss" in skip
            else [Metric("val/loss", float(loss) + 0.5, 0, 0), Metric("val/loss", float(loss), 0, 10)]
        )
        client.log_batch(
            run.info.run_id, metrics=metrics, tags=tags, params=[Param(k, v) for k, v in params.items()]
        )
        if finish:
            client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    exp = client.create_experiment("sweep", artifact_location=(root / "artifacts").as_uri())
    for i, (kind, law) in enumerate(sorted(LAWS.items())):
        n, d, loss = _isoflop_runs(law, [1e17, 1e18, 1e19, 1e20], sizes=6, noise=0.001, seed=i)
        for nn, dd, ll in zip(n, d, loss):
            log_run(exp, kind, nn, dd, 6 * nn * dd * FLOPS_RATIO[kind], ll)
    log_run(exp, "transformer", 1e8, 1e9, 6e17, 0.1, group="other")  # other group
    log_run(exp, "transformer", 1e8, 1e9, 6e17, 0.1, finish=False)  # still running

    broken = client.create_experiment("broken", artifact_location=(root / "b").as_uri())
    ids = [log_run(broken, "mamba", 1e8 * (i + 1), 1e9, 6e17 * (i + 1), 3.0) for i in range(5)]
    no_loss = log_run(broken, "mamba", 1e8, 2e9, 1.2e18, 3.0, skip=("loss",))
    no_kind = log_run(broken, "mamba", 1e8, 3e9, 1.8e18, 3.0, skip=("kind",))
    return {"uri": uri, "no_loss": no_loss, "no_kind": no_kind, "broken_ok": ids}


def _is_png(path: Path) -> bool:
    import matplotlib.image

    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    image = matplotlib.image.imread(path)
    return image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_cli_fit_end_to_end(mlflow_store, tmp_path, capsys):
    from hybrid_megatron.scaling.__main__ import main

    out = tmp_path / "fit"
    code = main(
        [
            "fit",
            "--tracking-uri",
            mlflow_store["uri"],
            "--experiment",
            "sweep",
            "--group",
            "g1",
            "--out",
            str(out),
            "--bootstrap",
            "8",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "transformer: 24 runs" in capsys.readouterr().out
    doc = json.loads((out / "fit.json").read_text())
    assert doc["experiment"] == "sweep" and doc["group"] == "g1"
    assert doc["plots"] == ["isoflop.png", "loss_vs_compute.png"]
    assert set(doc["kinds"]) == set(LAWS)
    for kind, law in LAWS.items():
        entry = doc["kinds"][kind]
        assert entry["n_runs"] == 24 and len(entry["run_ids"]) == 24  # group/unfinished excluded
        assert set(entry) >= {"law", "compute_optimal", "flops_ratio", "isoflop", "bootstrap"}
        fit = entry["law"]
        assert set(fit) >= {"E", "A", "B", "alpha", "beta", "G", "a", "b", "objective"}
        assert fit["alpha"] == pytest.approx(law["alpha"], abs=0.05)
        assert fit["beta"] == pytest.approx(law["beta"], abs=0.05)
        assert fit["E"] == pytest.approx(law["E"], rel=0.03)
        true_a = law["beta"] / (law["alpha"] + law["beta"])
        assert entry["compute_optimal"]["a"] == pytest.approx(true_a, abs=0.05)
        assert entry["flops_ratio"] == pytest.approx(FLOPS_RATIO[kind], rel=1e-6)
        iso = entry["isoflop"]
        assert iso["used_budgets"] == 4 and iso["exponent"] == pytest.approx(true_a, abs=0.04)
        boot = entry["bootstrap"]
        assert boot["samples"] == 8
        lo, hi = boot["intervals"]["alpha"]
        assert lo <= fit["alpha"] <= hi
    assert _is_png(out / "loss_vs_compute.png") and _is_png(out / "isoflop.png")


def test_cli_clear_errors(mlflow_store, tmp_path, capsys):
    from hybrid_megatron.scaling.__main__ import main

    base = ["fit", "--tracking-uri", mlflow_store["uri"], "--out", str(tmp_path / "x")]
    assert main(base + ["--experiment", "broken"]) == 2
    err = capsys.readouterr().err
    assert f"val/loss: missing or invalid in run(s) {mlflow_store['no_loss']}" in err
    assert f"hm.kind: missing or invalid in run(s) {mlflow_store['no_kind']}" in err
    assert not any(run_id in err for run_id in mlflow_store["broken_ok"])

    assert main(base + ["--experiment", "sweep", "--group", "other"]) == 2
    assert "transformer: 1 run(s)" in capsys.readouterr().err
    assert main(base + ["--experiment", "nope"]) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err
    assert main(base + ["--experiment", "sweep", "--group", "missing"]) == 2
    assert "no finished runs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
