"""MoE load balance: tokens per expert per layer, counted at megatron-core's routers and
reported as shares and max-over-mean load in the loss log and MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import build_single
from tests.model_configs import tiny_model
from tests.training_helpers import REPO


def test_load_metrics_give_shares_and_max_over_mean_per_layer():
    from hybrid_megatron.training.expert_load import load_metrics

    metrics = load_metrics(torch.tensor([[1.0, 3.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    assert metrics["moe/layer1/max_over_mean"] == 2.0  # 4 over a mean of 2
    assert [metrics[f"moe/layer1/expert{e}_fraction"] for e in range(4)] == [0.125, 0.375, 0.0, 0.5]
    assert metrics["moe/layer3/max_over_mean"] == 1.0
    assert not any(key.startswith("moe/layer2/") for key in metrics)  # routed nothing
    assert metrics["moe/max_over_mean"] == 2.0


def test_router_hooks_count_every_routed_token_of_training_forwards(single_rank):
    from hybrid_megatron.training.expert_load import ExpertLoad

    cfg = tiny_model("intra", moe=True)
    model = build_single(cfg, seed=4)
    load = ExpertLoad([model], window=2)
    ids = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).unsqueeze(0).expand(2, -1)
    model.train()
    model(ids, pos, None, labels=ids).float().mean().backward()
    model.eval()
    with torch.no_grad():
        model(ids, pos, None, labels=ids)  # not training: not counted
    counts = load.counts.clone()
    moe_layers = [row for row in counts.tolist() if sum(row) > 0]
    assert len(moe_layers) == cfg["num_layers"]  # every block of the tiny intra model has MoE
    for row in moe_layers:  # each of the 48 tokens went to top_k = 2 experts
        assert sum(row) == 48 * 2 and all(c == int(c) for c in row)
    assert load.of_step(1) == {}  # mid-window
    metrics = load.of_step(2)
    assert load.counts.sum() == 0  # a new window starts
    for layer, row in enumerate(counts.tolist(), start=1):
        if sum(row) == 0:
            continue
        shares = [metrics[f"moe/layer{layer}/expert{e}_fraction"] for e in range(4)]
        assert shares == pytest.approx([c / sum(row) for c in row], abs=1e-15)
        assert sum(shares) == pytest.approx(1.0, abs=1e-12)
        assert metrics[f"moe/layer{layer}/max_over_mean"] == pytest.approx(max(row) / (sum(row) / 4))
    load.remove()


@pytest.mark.slow  # a short run of the real trainer with MLflow tracking
def test_trainer_logs_expert_load_to_the_loss_log_and_mlflow(single_rank, tmp_path):
    from mlflow.tracking import MlflowClient

    from hybrid_megatron.config import load_recipe
    from hybrid_megatron.training import entry

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    MlflowClient(tracking_uri=uri).create_experiment("moe", artifact_location=str(tmp_path / "artifacts"))
    recipe = load_recipe(
        str(REPO / "recipes" / "intra_tiny_moe.yaml"),
        [
            f"checkpoint.dir={tmp_path}/run/checkpoints",
            "parallel.tp=1",
            "parallel.sequence_parallel=false",
            "model.num_layers=2",
            "data.seq_length=64",
            "train.global_batch_size=4",
            "train.steps=4",
            "train.warmup_steps=1",
            "train.log_interval=2",
            "train.eval_interval=0",
            "checkpoint.interval=100",
            "tracking.enabled=true",
            f"tracking.tracking_uri={uri}",
            "tracking.experiment=moe",
        ],
    )
    summary = entry.train(recipe)
    records = [
        json.loads(line) for line in (Path(recipe.run_dir) / "train_log.jsonl").read_text().splitlines()
    ]
    with_load = {r["step"]: r for r in records if "moe/max_over_mean" in r}
    assert sorted(with_load) == [2, 4]
    for record in with_load.values():
        layers = {k.split("/")[1] for k in record if k.startswith("moe/layer")}
        assert layers == {"layer1", "layer2"}
        for layer in layers:
            shares = [record[f"moe/{layer}/expert{e}_fraction"] for e in range(4)]
            assert sum(shares) == pytest.approx(1.0, abs=1e-12)
            assert record[f"moe/{layer}/max_over_mean"] == pytest.approx(max(shares) * 4)
        assert record["moe/max_over_mean"] == max(record[f"moe/{layer}/max_over_mean"] for layer in layers)
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(summary["mlflow_run_id"], "moe/max_over_mean")
    assert {m.step: m.value for m in history} == {s: r["moe/max_over_mean"] for s, r in with_load.items()}
    assert client.get_metric_history(summary["mlflow_run_id"], "moe/layer1/expert0_fraction")
