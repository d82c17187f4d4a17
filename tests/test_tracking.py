"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (started and stopped here)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.distributed import free_port
from tests.training_helpers import REPO


@pytest.fixture()
def mlflow_server(tmp_path):
    """An `mlflow server` on 127.0.0.1 with a SQLite store; yields its http URI."""
    port = free_port()
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
        stderr=open(tmp_path / "server.log", "wb"),
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-2000:])
        time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


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
    assert tags["hm.scale"] == "tiny"
    report = count_parameters(recipe.model)
    assert int(params["model.num_parameters"]) == report.total
    assert int(params["model.active_parameters"]) == report.active < report.total  # MoE
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
