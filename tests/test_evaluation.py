"""Evaluation: NLL, cached generation, cache bytes, NIAH harness, extrapolation, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import build_single
from tests.evaluation_helpers import InductionCopyModel, train_tiny
from tests.training_helpers import REPO

KINDS = ["transformer", "swa", "mamba", "inter", "intra"]


def _recipe(kind: str):
    from hybrid_megatron.config import load_recipe

    return load_recipe(str(REPO / "recipes" / f"{kind}_tiny.yaml"), ["tracking.enabled=false"])


@pytest.fixture(scope="module")
def trained(single_rank, tmp_path_factory):
    """A tiny inter-layer hybrid trained 4 steps: (summary, run dir)."""

    run_dir = tmp_path_factory.mktemp("eval_inter")
    return train_tiny("inter", run_dir, 4), run_dir


def test_trainer_evaluate_reports_true_validation_loss(trained):
    from hybrid_megatron.evaluation.common import load_for_eval
    from hybrid_megatron.evaluation.nll import evaluate_nll, validation_set
    from hybrid_megatron.training.step import evaluate

    summary, _ = trained
    recipe, model = load_for_eval(summary["last_checkpoint"])
    batches = validation_set(recipe)
    assert abs(evaluate([model], batches, 128) - evaluate_nll(model, batches, 128)["nll"]) < 1e-5


def test_nll_equals_trainer_validation_loss(trained):
    from hybrid_megatron.evaluation.nll import run_nll

    summary, _ = trained
    res = run_nll(summary["last_checkpoint"])
    assert res["tokens"] == 2 * 8 * 128  # eval_iters x global batch x seq
    assert abs(res["nll"] - summary["final_val_loss"]) < 1e-5
    assert abs(res["nll_micro_batch_mean"] - summary["final_val_loss"]) < 1e-5
    assert res["perplexity"] == pytest.approx(torch.tensor(res["nll"]).exp().item())
    # an independent check: the model's per-token loss averaged by hand over the same samples
    from hybrid_megatron.evaluation.common import load_for_eval, per_token_nll
    from hybrid_megatron.evaluation.nll import validation_set

    recipe, model = load_for_eval(summary["last_checkpoint"])
    losses = [per_token_nll(model, mb["tokens"], mb["labels"]) for g in validation_set(recipe) for mb in g]
    assert abs(torch.cat(losses).double().mean().item() - res["nll"]) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_uncached(single_rank, kind):
    """Greedy and sampled; prompt 40 + 40 new tokens (> the SWA window of 32)."""
    from hybrid_megatron.evaluation.generation import generate

    model = build_single(_recipe(kind).model.model_dump())
    model.eval()
    prompt = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    for temperature in (0.0, 1.0):
        plain = generate(model, prompt, 40, use_cache=False, temperature=temperature, seed=3).tokens
        cached = generate(model, prompt, 40, use_cache=True, temperature=temperature, seed=3).tokens
        assert torch.equal(plain, cached), (kind, temperature, (plain != cached).sum().item())


@pytest.mark.parametrize("kind", KINDS)
def test_measured_cache_bytes_equal_accounting(single_rank, kind):
    from hybrid_megatron.evaluation.inference import cache_check

    recipe = _recipe(kind)
    model = build_single(recipe.model.model_dump())
    model.eval()
    res = cache_check(model, recipe.model, prompt_len=40, new_tokens=8)
    m, a = res["measured"], res["accounted"]
    assert m["seq_len"] == 48 and m["dtype_bytes"] == 4
    assert {k: m[k] for k in a} == a, (m, a)
    assert res["equal"] and m["total"] > 0


def test_niah_copying_model_scores_full_accuracy_and_writes_heatmap(tmp_path):
    from hybrid_megatron.data.tokenizer import load_tokenizer
    from hybrid_megatron.evaluation.niah import niah_grid, plot_heatmap

    tok = load_tokenizer(REPO / "data" / "tokenizer")
    filler = tok.encode(json.loads((REPO / "data" / "austen.jsonl").open().readline())["text"])
    res = niah_grid(
        InductionCopyModel(tok.vocab_size), tok, filler, [64, 256], [0.0, 0.5, 1.0], trials=2, use_cache=False
    )
    assert res["accuracy"] == [[1.0] * 3] * 2, res["samples"]
    png = plot_heatmap(res, tmp_path / "niah.png")
    assert png.stat().st_size > 1000


def test_niah_scores_zero_for_a_non_copying_model():
    """The harness does not give credit for free: a constant model scores 0."""
    from hybrid_megatron.data.tokenizer import load_tokenizer
    from hybrid_megatron.evaluation.niah import niah_grid

    class Constant(torch.nn.Module):
        def forward(self, ids, pos=None, mask=None, **_):
            out = torch.zeros(*ids.shape, 4096)
            out[..., 300] = 1.0
            return out

    tok = load_tokenizer(REPO / "data" / "tokenizer")
    filler = tok.encode(json.loads((REPO / "data" / "austen.jsonl").open().readline())["text"])
    res = niah_grid(Constant(), tok, filler, [64], [0.5], trials=2, use_cache=False)
    assert res["accuracy"] == [[0.0]]


def test_cli_extrapolation_niah_inference_on_checkpoint(trained, tmp_path):
    from hybrid_megatron.evaluation.__main__ import main

    summary, _ = trained
    ckpt = str(summary["last_checkpoint"])
    out = tmp_path / "out"
    assert (
        main(
            [
                "extrapolation",
                "--checkpoint",
                ckpt,
                "--checkpoint",
                ckpt,
                "--out",
                str(out),
                "--multiples",
                "1,2,4",
                "--num-sequences",
                "1",
            ]
        )
        == 0
    )
    res = json.loads((out / "extrapolation.json").read_text())
    assert len(res) == 2 and (out / "extrapolation.png").stat().st_size > 1000
    for r in res.values():
        assert set(r["contexts"]) == {"128", "256", "512"}
        for c in r["contexts"].values():
            losses = [b["loss"] for b in c["buckets"]]
            assert len(losses) == int(c["multiple"]) * 4
            # finite, and below a uniform guess over the 4096-token vocab (ln 4096 = 8.32) + slack
            assert all(0 < x < 10 for x in losses)
    assert (
        main(
            [
                "niah",
                "--checkpoint",
                ckpt,
                "--out",
                str(out),
                "--contexts",
                "64,128",
                "--depths",
                "0,1",
                "--trials",
                "1",
            ]
        )
        == 0
    )
    niah = json.loads((out / "niah.json").read_text())
    grid = next(iter(niah.values()))["accuracy"]
    assert len(grid) == 2 and all(0 <= a <= 1 for row in grid for a in row)
    assert list(out.glob("niah_*.png"))
    assert (
        main(
            [
                "inference",
                "--checkpoint",
                ckpt,
                "--out",
                str(out),
                "--batch-sizes",
                "1,2",
                "--contexts",
                "32,64",
                "--new-tokens",
                "4",
            ]
        )
        == 0
    )
    inf = next(iter(json.loads((out / "inference.json").read_text()).values()))
    assert inf["cache_matches_accounting"] is True
    assert len(inf["throughput"]) == 4 and all(r["decode_tokens_per_s"] > 0 for r in inf["throughput"])


def test_mlflow_log_writes_to_the_checkpoints_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from hybrid_megatron.evaluation.mlflow_log import log_results

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("eval-test", artifact_location=str(tmp_path / "art")))
    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    assert log_results(root, None, {"eval/nll/nll": 1.0}, tracking_uri=uri) is None  # no id file yet
    (root / "mlflow_run_id").write_text(run.info.run_id)
    artifact = tmp_path / "nll.json"
    artifact.write_text("{}")
    assert (
        log_results(root / "step_00000004", None, {"eval/nll/nll": 2.5}, [artifact], tracking_uri=uri)
        == run.info.run_id
    )
    assert client.get_run(run.info.run_id).data.metrics["eval/nll/nll"] == 2.5
    assert [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")] == ["evaluation/nll.json"]


def test_mlflow_log_opens_the_store_under_its_lock(tmp_path):
    """Logging waits for the store's lock (held here as another process creating the store would
    hold it) and then logs; a run id the store does not hold is one error naming the id file."""
    import threading

    from mlflow.tracking import MlflowClient

    from hybrid_megatron.evaluation.mlflow_log import RunNotInStoreError, log_results
    from hybrid_megatron.tracking.store import store_lock

    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    (root / "mlflow_run_id").write_text("0123456789abcdef0123456789abcdef")
    fresh = f"sqlite:///{tmp_path}/fresh/mlruns.db"
    with pytest.raises(
        RunNotInStoreError,
        match=f"{root}/mlflow_run_id: names MLflow run 0123456789abcdef0123456789abcdef, which the "
        f"tracking store {fresh} does not hold",
    ):
        log_results(root, None, {"eval/nll/nll": 1.0}, tracking_uri=fresh)
    assert (tmp_path / "fresh" / "mlruns.db.lock").exists()

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("eval-lock", artifact_location=str(tmp_path / "art")))
    (root / "mlflow_run_id").write_text(run.info.run_id)
    done = []
    logger = threading.Thread(
        target=lambda: done.append(log_results(root, None, {"eval/nll/nll": 3.0}, tracking_uri=uri))
    )
    with store_lock(uri):
        logger.start()
        logger.join(timeout=1.0)
        assert logger.is_alive() and done == []  # waits for the lock
        assert "eval/nll/nll" not in client.get_run(run.info.run_id).data.metrics
    logger.join(timeout=60)
    assert done == [run.info.run_id]
    assert client.get_run(run.info.run_id).data.metrics["eval/nll/nll"] == 3.0


def test_validation_set_does_not_depend_on_the_training_layout(single_rank):
    """A checkpoint trained at TP=2 evaluates on one rank: same samples as the TP=1 recipe."""
    from hybrid_megatron.config import load_recipe
    from hybrid_megatron.evaluation.nll import validation_set

    tp2 = load_recipe(str(REPO / "recipes" / "inter_tiny.yaml"), ["tracking.enabled=false", "parallel.tp=2"])
    a, b = validation_set(_recipe("inter")), validation_set(tp2)
    assert len(a) == len(b) == 2
    assert all(torch.equal(x["tokens"], y["tokens"]) for ga, gb in zip(a, b) for x, y in zip(ga, gb))


def _two_rank_eval(rank: int, world: int, ckpt: str, prefix: str) -> dict:
    """On 2 ranks: nll at TP=2, at PP=2 and (TP=1, DP=2) on ``prefix``; TP=2 generation cached
    and uncached (greedy and sampled) and last-position logits."""
    from hybrid_megatron.evaluation.common import load_for_eval, logits_of
    from hybrid_megatron.evaluation.generation import generate
    from hybrid_megatron.evaluation.nll import run_nll

    out = {"nll_tp2": run_nll(ckpt, tp=2)["nll"]}
    _, model = load_for_eval(ckpt, tp=2)
    prompt = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    out["logits_tp2"] = logits_of(model, prompt)[:, -1].tolist()
    out["generate"] = {
        str(t): [
            generate(model, prompt, 24, use_cache=c, temperature=t, seed=3).tokens.tolist()
            for c in (False, True)
        ]
        for t in (0.0, 1.0)
    }
    out["nll_pp2"] = run_nll(ckpt, pp=2)["nll"]
    dp2 = run_nll(ckpt, data_prefix=prefix, num_samples=4)
    out["nll_dp2"], out["tokens_dp2"] = dp2["nll"], dp2["tokens"]
    return out


@pytest.fixture(scope="module")
def two_rank_eval(trained, tmp_path_factory):
    """``_two_rank_eval`` on the trained checkpoint; one result dict per rank."""
    from tests.distributed import run_distributed

    summary, _ = trained
    prefix = str(REPO / "data" / "austen_4k_text_document")
    return run_distributed(
        _two_rank_eval, 2, tmp_path_factory.mktemp("two_rank_eval"), str(summary["last_checkpoint"]), prefix
    )


@pytest.mark.slow
def test_nll_at_tp2_and_pp2_equals_tp1(trained, two_rank_eval):
    from hybrid_megatron.evaluation.nll import run_nll

    summary, _ = trained
    ckpt = str(summary["last_checkpoint"])
    ref = run_nll(ckpt)["nll"]
    assert abs(ref - summary["final_val_loss"]) < 1e-5
    for r in two_rank_eval:
        assert abs(r["nll_tp2"] - ref) < 1e-5, (r["nll_tp2"], ref)
        assert abs(r["nll_pp2"] - ref) < 1e-5, (r["nll_pp2"], ref)
    held_out = run_nll(ckpt, data_prefix=str(REPO / "data" / "austen_4k_text_document"), num_samples=4)
    for r in two_rank_eval:  # data-parallel: each window counted once
        assert r["tokens_dp2"] == held_out["tokens"] == 4 * 128
        assert abs(r["nll_dp2"] - held_out["nll"]) < 1e-5


@pytest.mark.slow
def test_cached_generation_at_tp2_equals_uncached(trained, two_rank_eval):
    from hybrid_megatron.evaluation.common import load_for_eval, logits_of

    for r in two_rank_eval:
        for temperature, (plain, cached) in r["generate"].items():
            assert plain == cached, (temperature, plain, cached)
            assert len(plain[0]) == 40 + 24
    assert two_rank_eval[0]["generate"] == two_rank_eval[1]["generate"]  # TP ranks agree
    # the gathered TP=2 logits are the full-vocabulary TP=1 logits
    summary, _ = trained
    _, model = load_for_eval(summary["last_checkpoint"])
    prompt = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = logits_of(model, prompt)[:, -1]
    for r in two_rank_eval:
        tp2 = torch.tensor(r["logits_tp2"])
        assert tp2.shape == ref.shape == (2, 4096)
        assert (tp2 - ref).abs().max().item() < 1e-4
