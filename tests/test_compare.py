"""The research loop after a sweep: the printed next commands, ``scaling compare``'s table and
plot from a local MLflow store, ``fit`` pointing to ``compare``, and the shipped CPU sweep end to
end."""

from __future__ import annotations

import json
import shlex

import pytest

from tests.training_helpers import REPO

SCALING = ["python", "-m", "hybrid_megatron.scaling"]

# group "f": F-matched, two budgets x three kinds (+ a lone mamba run at a third budget);
# group "p": P-matched, two scales x two kinds at one token budget.
# (kind, N, D, C, final loss)
F_RUNS = [
    ("transformer", 1.0e6, 2.0e4, 1.20e11, 5.10),
    ("inter", 1.1e6, 1.9e4, 1.21e11, 5.00),
    ("intra", 1.2e6, 1.8e4, 1.19e11, 5.05),
    ("transformer", 1.0e6, 4.0e4, 2.40e11, 4.70),
    ("inter", 1.1e6, 3.8e4, 2.41e11, 4.75),
    ("intra", 1.2e6, 3.6e4, 2.39e11, 4.60),
    ("mamba", 1.0e6, 1.0e5, 6.00e11, 4.40),
]
P_RUNS = [
    ("transformer", 1.00e8, 2e9, 1.2e18, 3.30),
    ("mamba", 1.05e8, 2e9, 1.1e18, 3.25),
    ("transformer", 3.50e8, 2e9, 4.2e18, 3.00),
    ("mamba", 3.60e8, 2e9, 4.0e18, 3.02),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store, experiment "sweeps": groups "f" and "p" as above, group "pair"
    with two runs, group "one" with one, plus an unfinished run in "f" that must be ignored."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweeps", artifact_location=(root / "artifacts").as_uri())

    def log(group, match, kind, n, d, c, loss, finish=True):
        run = client.create_run(exp, tags={"hm.compare_group": group, "hm.match": match})
        params = {
            "model.num_parameters": str(int(n)),
            "train.tokens": str(int(d)),
            "train.flops": repr(float(c)),
        }
        client.log_batch(
            run.info.run_id,
            tags=[RunTag("hm.kind", kind)],
            params=[Param(k, v) for k, v in params.items()],
            metrics=[Metric("val/loss", loss + 1.0, 0, 1), Metric("val/loss", loss, 0, 9)],
        )
        if finish:
            client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    ids = {"f": [log("f", "F", *r) for r in F_RUNS], "p": [log("p", "P", *r) for r in P_RUNS]}
    log("f", "F", "transformer", 1.0e6, 2.0e4, 1.2e11, 0.5, finish=False)  # still running
    ids["pair"] = [
        log("pair", "F", "transformer", 1e6, 2e4, 1.2e11, 5.0),
        log("pair", "F", "swa", 1e6, 2e4, 1.2e11, 5.2),
    ]
    log("one", "F", "transformer", 1e6, 2e4, 1.2e11, 5.0)
    return {"uri": uri, "ids": ids}


def _compare(store, group, out, capsys):
    from hybrid_megatron.scaling.__main__ import main

    code = main(
        [
            "compare",
            "--tracking-uri",
            store["uri"],
            "--experiment",
            "sweeps",
            "--group",
            group,
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compare_f_matched_table(store, tmp_path, capsys):
    code, out, err = _compare(store, "f", tmp_path, capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "f: final val/loss per compute budget (F-matched), * = best in row"
    assert lines[1].split() == ["FLOPs", "transformer", "mamba", "inter", "intra"]  # paper order
    assert lines[2].split() == ["1.200e+11", "5.1000", "-", "5.0000*", "5.0500"]
    assert lines[3].split() == ["2.400e+11", "4.7000", "-", "4.7500", "4.6000*"]
    assert lines[4].split() == ["6.000e+11", "-", "4.4000", "-", "-"]  # one kind: nothing to mark
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert (doc["match"], doc["group"], doc["experiment"]) == ("F", "f", "sweeps")
    assert [r["best"] for r in doc["rows"]] == ["inter", "intra", None]
    assert doc["rows"][0]["run_ids"]["inter"] == [store["ids"]["f"][1]]  # the unfinished run is out
    assert doc["rows"][0]["value"] == pytest.approx((1.20e11 * 1.21e11 * 1.19e11) ** (1 / 3))
    png = (tmp_path / "loss_vs_flops.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_compare_p_matched_rows_are_parameter_counts(store, tmp_path, capsys):
    code, out, err = _compare(store, "p", tmp_path, capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "per parameter count (P-matched)" in lines[0]
    assert lines[1].split() == ["params", "transformer", "mamba"]
    assert lines[2].split() == ["102M", "3.3000", "3.2500*"]
    assert lines[3].split() == ["355M", "3.0000*", "3.0200"]


def test_compare_from_two_runs_and_not_one(store, tmp_path, capsys):
    code, out, _ = _compare(store, "pair", tmp_path, capsys)
    assert code == 0 and out.splitlines()[2].split() == ["1.200e+11", "5.0000*", "5.2000"]
    code, _, err = _compare(store, "one", tmp_path / "one", capsys)
    assert code == 2 and "a comparison needs at least 2 runs, got 1" in err


def test_repeated_runs_of_a_kind_are_averaged():
    from hybrid_megatron.scaling.compare import compare
    from hybrid_megatron.scaling.runs import RunPoint

    points = [
        RunPoint("a", "mamba", 1e6, 1e4, 1e11, 4.0),
        RunPoint("b", "mamba", 1e6, 1e4, 1.01e11, 4.2),
        RunPoint("c", "inter", 1e6, 1e4, 1e11, 4.15),
    ]
    table = compare(points)
    assert table.rows[0].losses == {"mamba": pytest.approx(4.1), "inter": 4.15}
    assert table.rows[0].best == "mamba"
    assert table.format().splitlines()[2].split() == [
        "1.003e+11",
        "4.1000",
        "x2*",
        "4.1500",
    ]  # geometric mean FLOPs


def test_several_sizes_of_a_kind_at_one_budget_give_its_best_size():
    """An isoFLOP budget: a kind's loss is that of its best size (repeats of a size averaged
    first), not a mean over sizes that would mix in the sizes far from the optimum."""
    from hybrid_megatron.scaling.compare import compare
    from hybrid_megatron.scaling.runs import RunPoint

    points = [
        RunPoint("s", "mamba", 7e6, 2e8, 1e16, 3.30),
        RunPoint("m1", "mamba", 12e6, 1.2e8, 1e16, 3.10),
        RunPoint("m2", "mamba", 12.05e6, 1.2e8, 1e16, 3.20),  # a repeat of m (within 1%)
        RunPoint("l", "mamba", 26e6, 6e7, 1e16, 3.40),
        RunPoint("i", "inter", 12e6, 1.2e8, 1e16, 3.12),
    ]
    row = compare(points).rows[0]
    assert row.losses == {"mamba": pytest.approx(3.15), "inter": 3.12}
    assert row.best == "inter" and len(row.run_ids["mamba"]) == 4


def test_fit_refusing_too_few_runs_prints_the_compare_command(store, tmp_path, capsys):
    from hybrid_megatron.scaling.__main__ import main

    code = main(
        [
            "fit",
            "--tracking-uri",
            store["uri"],
            "--experiment",
            "sweeps",
            "--group",
            "f",
            "--out",
            str(tmp_path / "fit"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "too few runs to fit a scaling law (need at least 5 per kind)" in err
    command = err.splitlines()[-1].strip()
    assert shlex.split(command) == [
        *SCALING,
        "compare",
        "--tracking-uri",
        store["uri"],
        "--experiment",
        "sweeps",
        "--group",
        "f",
        "--out",
        str(tmp_path / "compare"),
    ]


def _next_commands(out: str) -> dict[str, list[str]]:
    """The printed next commands (comment markers stripped), by their verb."""
    commands = {}
    for line in out.splitlines():
        words = (
            shlex.split(line.lstrip("# "), comments=False)
            if "hybrid_megatron.scaling" in line or "mlflow ui" in line
            else []
        )
        if words[:3] == SCALING:
            commands[words[3]] = words
        elif words[:2] == ["mlflow", "ui"]:
            commands["ui"] = words
    return commands


def test_sweep_dry_run_prints_the_next_commands(tmp_path, capsys):
    from hybrid_megatron.launch import cli

    assert (
        cli.main(
            [
                str(REPO / "recipes" / "sweeps" / "tiny_F.yaml"),
                "--sweep",
                "--dry-run",
                f"checkpoint.dir={tmp_path}/runs/base/checkpoints",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    uri = f"sqlite:///{tmp_path}/runs/tiny-F/mlruns.db"
    commands = _next_commands(out)
    assert commands == {
        "compare": [
            *SCALING,
            "compare",
            "--tracking-uri",
            uri,
            "--experiment",
            "hybrid_megatron-tiny",
            "--group",
            "tiny-F",
            "--out",
            f"{tmp_path}/runs/tiny-F/compare",
        ],
        "ui": ["mlflow", "ui", "--backend-store-uri", uri],
    }
    assert "no fit: a scaling law needs at least 5 runs per kind, this sweep has 2" in out


def test_next_steps_include_fit_with_enough_runs():
    from hybrid_megatron.scaling.sweep import SweepRun, SweepSpec, next_steps

    spec = SweepSpec(name="g", match="F", recipes=["x.yaml"], tokens=[1000], reference="x")
    runs = [SweepRun(f"r{i}", "x.yaml", (), kind, 1, 1, 1.0) for i in range(5) for kind in ("mamba", "inter")]
    commands = _next_commands(next_steps(spec, runs, [("sqlite:///s.db", "e")], "/r/g"))
    assert commands["fit"] == [
        *SCALING,
        "fit",
        "--tracking-uri",
        "sqlite:///s.db",
        "--experiment",
        "e",
        "--group",
        "g",
        "--out",
        "/r/g/fit",
    ]
    assert set(commands) == {"compare", "fit", "ui"}


# six CPU training runs: 2 to 6 minutes on 2 cores (outside `make test`, in `make test-long`)
@pytest.mark.long
def test_shipped_tiny_sweep_end_to_end(tmp_path, capsys, monkeypatch):
    """recipes/sweeps/tiny_F.yaml run locally, then the compare (and fit) commands it prints,
    exactly as printed: the table holds both budgets with all three kinds and one best each."""
    from hybrid_megatron.launch import cli
    from hybrid_megatron.scaling.__main__ import main as scaling

    monkeypatch.delenv("HM_TRAIN_ENTRY", raising=False)
    code = cli.main(
        [
            str(REPO / "recipes" / "sweeps" / "tiny_F.yaml"),
            "--sweep",
            "--local",
            f"checkpoint.dir={tmp_path}/runs/base/checkpoints",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[sweep] 6/6 runs succeeded (compare group tiny-F)" in out
    commands = _next_commands(out.split("next steps:")[1])
    assert set(commands) == {"compare", "ui"}  # 2 runs per kind: no fit
    assert scaling(commands["compare"][3:]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["FLOPs", "transformer", "inter", "intra"]
    rows = [line.split() for line in table[2:4]]
    assert [len(r) for r in rows] == [4, 4]
    for row in rows:
        losses = [float(cell.rstrip("*")) for cell in row[1:]]
        assert all(2.0 < x < 11.0 for x in losses)  # a byte-level-ish tiny vocab, barely trained
        assert sum(cell.endswith("*") for cell in row[1:]) == 1
        assert row[1 + losses.index(min(losses))].endswith("*")
    assert float(rows[0][0]) < float(rows[1][0])
    doc = json.loads((tmp_path / "runs" / "tiny-F" / "compare" / "compare.json").read_text())
    assert sum(len(ids) for r in doc["rows"] for ids in r["run_ids"].values()) == 6
    # fit refuses 2 runs per kind and points back to the same comparison
    fit = [*commands["compare"][3:]]
    fit[0], fit[-1] = "fit", f"{tmp_path}/runs/tiny-F/fit"
    assert scaling(fit) == 2
    assert capsys.readouterr().err.splitlines()[-1].strip() == shlex.join(commands["compare"])


def test_claims_read_the_compare_table_of_a_real_store(store, tmp_path, capsys):
    """``scaling claims`` on the table ``compare`` wrote: at 1.2e11 both hybrids beat the
    Transformer, at 2.4e11 inter does not; the claims whose columns no row holds are not run."""
    from hybrid_megatron.scaling.__main__ import main

    code, _, err = _compare(store, "f", tmp_path, capsys)
    assert code == 0, err
    out_md = tmp_path / "claims.md"
    assert main(["claims", str(tmp_path / "compare.json"), "--out", str(out_md)]) == 0
    printed = capsys.readouterr().out
    assert out_md.read_text() == printed
    rows = [line for line in printed.splitlines() if line.startswith("| hybrids beat the Transformer")]
    assert len(rows) == 2
    assert rows[0].endswith("| f | 1.200e+11 | inter 5.0000, intra 5.0500, transformer 5.1000 | agrees |")
    assert rows[1].endswith(
        "| f | 2.400e+11 | intra 4.6000, transformer 4.7000, inter 4.7500 | does not hold at this scale |"
    )
    assert "| hybrids beat Mamba and SWA | " in printed and "| - | - | - | not run |" in printed
    # and intra ahead of inter at 2.4e11 only: 2 of 4 pairs; 11 of the 13 claims need other tables
    last = printed.splitlines()[-1]
    assert last == "2 of 4 tested (claim, budget) pairs agree with the paper; 11 claims not run."
