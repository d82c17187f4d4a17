"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (started and stopped here)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.distributed import free_port
from tests.training_helpers import REPO


def start_server(tmp_path, port: int) -> subprocess.Popen:
    """An `mlflow server` on 127.0.0.1:``port`` with a SQLite store in ``tmp_path``, once it
    answers ``/health``."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "server.log", "ab"),
    )
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-2000:])
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and wait until it has gone (its port refuses connections)."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture()
def mlflow_server(tmp_path):
    """An `mlflow server` on 127.0.0.1 with a SQLite store; yields its http URI."""
    port = free_port()
    proc = start_server(tmp_path, port)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def test_training_run_is_logged_to_mlflow_server(single_rank, tmp_path, mlflow_server):
    import mlflow

    from hybrid_megatron.accounting import count_parameters, model_flops_per_token
    from hybrid_megatron.config import load_recipe
    from hybrid_megatron.training.entry import train

    recipe = load_recipe(
        REPO / "recipes" / "inter_tiny_moe.yaml",
        [
            f"checkpoint.dir={tmp_path}/run/checkpoints",
            "train.steps=6",
            "train.warmup_steps=1",
            "train.eval_interval=3",
            "checkpoint.interval=6",
            f"tracking.tracking_uri={mlflow_server}",
            "tracking.experiment=hm-test",
            "tracking.compare_group=g1",
            "tracking.match=P",
            "tracking.variant=moe",
        ],
    )
    summary = train(recipe)

    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["hm-test"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    tags, params = run.data.tags, run.data.params
    assert tags["hm.kind"] == "inter" and tags["hm.compare_group"] == "g1" and tags["hm.match"] == "P"
    assert tags["hm.scale"] == "tiny" and tags["hm.variant"] == "moe"
    report = count_parameters(recipe.model)
    assert int(params["model.num_parameters"]) == report.total
    assert int(params["model.active_parameters"]) == report.active < report.total  # MoE
    assert int(params["model.non_embedding_parameters"]) == report.non_embedding < report.total
    tokens = 6 * recipe.train.global_batch_size * recipe.data.seq_length
    assert int(params["train.tokens"]) == tokens
    assert float(params["train.flops"]) == pytest.approx(
        tokens * model_flops_per_token(recipe.model, recipe.data.seq_length)
    )
    assert params["model.intra.fusion"] == "concat" and params["train.steps"] == "6"  # flattened recipe

    client = mlflow.tracking.MlflowClient()
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == [1, 2, 3, 4, 5, 6]
    assert loss[-1].value == pytest.approx(summary["final_loss"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [3, 6]
    for key in ("train/tokens_per_s", "train/tokens_seen", "train/flops_seen"):
        history = client.get_metric_history(run.info.run_id, key)
        assert len(history) == 6 and all(m.value > 0 for m in history), key
    seen = client.get_metric_history(run.info.run_id, "train/tokens_seen")
    assert seen[-1].value == tokens
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "loss_curve.png"} <= artifacts
    png = Path(client.download_artifacts(run.info.run_id, "loss_curve.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- a tracking server that is not there at the start ---------------------------------------


def test_unreachable_server_is_one_line_within_seconds(capsys):
    from hybrid_megatron.launch import cli

    start = time.monotonic()
    code = cli.main(
        [
            str(REPO / "recipes" / "inter_tiny.yaml"),
            "--local",
            "--dry-run",
            "tracking.tracking_uri=http://127.0.0.1:9",
        ]
    )
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and elapsed < 10, elapsed
    assert err[-1] == (
        "error: tracking.tracking_uri http://127.0.0.1:9: no tracking server answers (connection refused); "
        "start it, fix the URI, or set tracking.enabled=false"
    )


def test_silent_server_times_out_in_seconds():
    """A port that accepts connections but never answers (a hung server) fails the probe after
    its timeout, not MLflow's minutes of retries."""
    import socket

    from hybrid_megatron.tracking.store import TrackingServerError, check_reachable

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingServerError, match="no answer within 1 s") as info:
            check_reachable(uri, timeout_s=1.0)
        assert 0.9 < time.monotonic() - start < 5
    assert str(info.value).startswith(f"tracking.tracking_uri {uri}: ")


def test_live_server_passes_the_probe(mlflow_server):
    from hybrid_megatron.tracking.store import check_reachable

    check_reachable(mlflow_server)  # raises if not


# ---- the spool: a store that never answered, then `sync` -------------------------------------


def _tiny_recipe(tmp_path, uri, *extra):
    from hybrid_megatron.config import load_recipe

    return load_recipe(
        REPO / "recipes" / "inter_tiny.yaml",
        [
            f"checkpoint.dir={tmp_path}/run/checkpoints",
            f"tracking.tracking_uri={uri}",
            "tracking.experiment=spool",
            *extra,
        ],
    )


def _sync(*args):
    return subprocess.run(
        [sys.executable, "-m", "hybrid_megatron.tracking", "sync", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )


def test_records_kept_while_down_then_synced_once(tmp_path):
    """The store is down for the whole run: training-side calls return at once, everything is
    spooled; `sync` sends it in order; a second `sync` and a replayed offset send nothing twice."""
    from mlflow.tracking import MlflowClient

    from hybrid_megatron.tracking import RunTracker
    from hybrid_megatron.tracking.spool import Spool

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    recipe = _tiny_recipe(tmp_path, down, "tracking.tags={team: a}")
    start = time.monotonic()
    tracker = RunTracker(recipe, {"train.tokens": 1234}, active=True)
    for step in range(1, 9):
        tracker.log_metrics({"train/loss": 10.0 - step, "train/lr": step * 1e-4}, step)
        tracker.flush()
    tracker.finish()
    assert time.monotonic() - start < 60  # one failed try, then no try within the retry interval
    assert tracker.run_id is None  # the store never created the run
    run_dir = Path(recipe.run_dir)
    spool = Spool(run_dir)
    ops = [r["op"] for _, r in spool.unsent()]
    assert ops[0] == "create_run" and ops[-2:] == ["log_artifact", "set_status"]

    store = f"sqlite:///{tmp_path}/later/mlruns.db"
    first = _sync(run_dir, "--tracking-uri", store)
    assert first.returncode == 0, first.stderr
    run_id = (Path(recipe.checkpoint.dir) / "mlflow_run_id").read_text()
    assert first.stdout.strip() == f"sent {len(ops)} records to MLflow run {run_id} at {store}"
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == recipe.name
    assert run.data.tags["team"] == "a" and run.data.params["train.tokens"] == "1234"
    assert run.data.params["train.steps"] == str(recipe.train.steps)
    assert {a.path for a in client.list_artifacts(run_id)} >= {"recipe.yaml", "loss_curve.png"}

    def history():
        return [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]

    assert history() == [(s, 10.0 - s) for s in range(1, 9)]
    again = _sync(run_dir, "--tracking-uri", store)
    assert again.returncode == 0 and again.stdout.startswith(f"{run_dir}: nothing to send"), again
    # A crash after sending but before the offset moved: the replay adds no second copy.
    (spool.dir / "sent").write_text("0")
    replay = _sync(run_dir, "--tracking-uri", store)
    assert replay.returncode == 0, replay.stderr
    assert history() == [(s, 10.0 - s) for s in range(1, 9)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_sync_while_store_down_keeps_records(tmp_path):
    from hybrid_megatron.tracking import RunTracker

    down = f"http://127.0.0.1:{free_port()}"
    recipe = _tiny_recipe(tmp_path, down)
    tracker = RunTracker(recipe, {}, active=True)
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.finish()
    result = _sync(recipe.run_dir)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {down} did not take the records (") and line.endswith(
        f"of {len(tracker.spool.unsent())} still kept in {tracker.spool.dir}"
    )
    missing = _sync(tmp_path / "nowhere")
    assert missing.returncode == 2 and "no tracking spool" in missing.stderr


# ---- a tracking server lost in the middle of a run -------------------------------------------


@pytest.mark.long
def test_server_outage_mid_run_loses_nothing(single_rank, tmp_path, monkeypatch):
    """The server stops after step 3 and comes back after step 8 (same port, same store):
    training goes on; the steps logged meanwhile reach MLflow once it answers again (before
    the run ends), every step's metrics once and in order."""
    from mlflow.tracking import MlflowClient

    from hybrid_megatron.tracking import mlflow_tracker
    from hybrid_megatron.training import entry, trainable

    monkeypatch.setattr(mlflow_tracker, "RETRY_INTERVAL_S", 0.0)  # retry at every flush
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = [start_server(tmp_path, port)]
    steps, seen_after_restart = [0], []
    real_step = trainable.train_step

    def step_with_outage(*args, **kwargs):
        out = real_step(*args, **kwargs)
        steps[0] += 1
        if steps[0] == 3:
            stop_server(server[0])
        elif steps[0] == 8:
            server[0] = start_server(tmp_path, port)
        elif steps[0] == 10:  # steps 1-9 were flushed by now: the backlog went out at step 9
            run_id = (tmp_path / "run" / "checkpoints" / "mlflow_run_id").read_text()
            history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")
            seen_after_restart.extend(m.step for m in history)
        return out

    monkeypatch.setattr(trainable, "train_step", step_with_outage)
    try:
        summary = entry.train(
            _tiny_recipe(
                tmp_path,
                uri,
                "train.steps=12",
                "train.warmup_steps=1",
                "train.log_interval=1",
                "train.eval_interval=6",
                "checkpoint.interval=100",
            )
        )
        assert summary["steps"] == 12
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert sorted(seen_after_restart) == list(range(1, 10))
        for key in ("train/loss", "train/lr", "train/tokens_seen"):
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == list(range(1, 13)), key
            assert [m.timestamp for m in history] == sorted(m.timestamp for m in history), key
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [6, 12]
        loss = client.get_metric_history(run.info.run_id, "train/loss")
        assert loss[-1].value == pytest.approx(summary["final_loss"])
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"recipe.yaml", "loss_curve.png"}
        spool = tmp_path / "run" / "mlflow_spool"
        assert (spool / "sent").read_text() == str((spool / "records.jsonl").stat().st_size)
    finally:
        stop_server(server[0])


# ---- concurrent first use of a SQLite store ---------------------------------------------------

_OPENER = """
import sys, time
from pathlib import Path
from hybrid_megatron.tracking.store import open_store
uri, ready, go, index = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
ready.touch()
while not go.exists():
    time.sleep(0.005)
client, experiment_id = open_store(uri, "race")
run = client.create_run(experiment_id, run_name=f"opener-{index}")
client.log_metric(run.info.run_id, "x", float(index), step=1)
client.set_terminated(run.info.run_id)
print(run.info.run_id)
"""


@pytest.mark.long
def test_concurrent_first_open_of_sqlite_store(tmp_path):
    """Four processes open one fresh SQLite store at the same moment (a start barrier); each
    creates a run and logs a metric; all succeed (MLflow's schema migration runs once)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/store/mlruns.db"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPENER, uri, str(tmp_path / f"ready{i}"), str(go), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for i in range(4)
    ]
    deadline = time.time() + 240
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in results]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("race")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(out.strip() for out, _ in results)
    assert sorted(r.data.metrics["x"] for r in runs) == [0.0, 1.0, 2.0, 3.0]
    assert experiment.artifact_location == str((tmp_path / "store" / "mlartifacts").resolve())
    assert (tmp_path / "store" / "mlruns.db.lock").exists()


@pytest.mark.long
def test_four_concurrent_local_launches_share_a_fresh_store(tmp_path):
    """Four `launch/slurm.py RECIPE --local` runs started together into one fresh SQLite store
    all succeed, each with its own finished MLflow run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/shared/mlruns.db"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "launch" / "slurm.py"),
                str(REPO / "recipes" / "inter_tiny.yaml"),
                "--local",
                f"checkpoint.dir={tmp_path}/run{i}/checkpoints",
                f"tracking.tracking_uri={uri}",
                "tracking.experiment=together",
                "train.steps=2",
                "train.warmup_steps=1",
                "train.eval_interval=2",
                "checkpoint.interval=100",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=1500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [out[-3000:] for out in outputs]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    ids = {(tmp_path / f"run{i}" / "checkpoints" / "mlflow_run_id").read_text() for i in range(4)}
    assert {r.info.run_id for r in runs} == ids and len(ids) == 4
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
