"""IsoFLOP sweeps: model sizes within each kind (``sweep.sizes``), budgets given as FLOPs
(``sweep.flops``), their errors, the shipped small study and how ``scaling fit`` / ``compare``
group its runs by budget with their different N."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from hybrid_megatron.accounting import count_parameters, model_flops_per_token
from hybrid_megatron.config import load_recipe
from hybrid_megatron.config.derived import derived
from hybrid_megatron.config.errors import RecipeError
from hybrid_megatron.scaling.sweep import format_sweep_table, load_sweep
from tests.training_helpers import REPO

TINY = REPO / "recipes"
STUDY = REPO / "recipes" / "sweeps" / "study_small_code_F.yaml"
KINDS = ["transformer", "swa", "mamba", "inter", "intra"]
PEAK_BF16 = 989e12  # H100 SXM dense bf16
STUDY_MFU = 0.15  # the study file's stated assumption for models this small

SIZES = "sizes: {s: [model.hidden_size=64], m: [model.hidden_size=128]}"


def _sweep(tmp_path, body: str, recipes=("transformer_tiny", "inter_tiny")):
    listed = ", ".join(f"{TINY}/{r}.yaml" for r in recipes)
    path = tmp_path / "sweep.yaml"
    path.write_text(f"sweep: {{name: iso, recipes: [{listed}], {body}}}\n")
    return path


def _per_token(run) -> float:
    recipe = load_recipe(run.recipe_path, run.overrides)
    return model_flops_per_token(recipe.model, recipe.data.seq_length)


def test_sizes_times_token_budgets_f_matched_to_a_sized_reference(tmp_path):
    path = _sweep(tmp_path, f"match: F, reference: transformer_tiny@m, tokens: [20K, 40K], {SIZES}")
    spec, runs = load_sweep(path)
    assert len(runs) == 2 * 2 * 2  # budgets x recipes x sizes
    assert [r.name for r in runs[:4]] == [
        "iso-transformer_tiny-s-20K",
        "iso-transformer_tiny-m-20K",
        "iso-inter_tiny-s-20K",
        "iso-inter_tiny-m-20K",
    ]
    assert [r.size for r in runs[:4]] == ["s", "m", "s", "m"]
    by_name = {r.name: r for r in runs}
    # the reference spends exactly its tokens; the size's override reaches the built recipe
    assert by_name["iso-transformer_tiny-m-20K"].tokens == 20_000
    for run in runs:
        recipe = load_recipe(run.recipe_path, run.overrides)
        assert recipe.model.hidden_size == {"s": 64, "m": 128}[run.size]
        assert recipe.train.tokens == run.tokens and recipe.name == run.name
        assert run.params == count_parameters(recipe.model).total
        assert run.non_embedding == count_parameters(recipe.model).non_embedding
    # N differs by size within a kind; every run of a budget spends the reference's FLOPs
    for kind in ("transformer", "inter"):
        small, medium = (by_name[f"iso-{kind}_tiny-{s}-20K"] for s in ("s", "m"))
        assert medium.params > 1.5 * small.params and medium.tokens < small.tokens
    ref_flops = _per_token(by_name["iso-transformer_tiny-m-20K"]) * 20_000
    for run in runs:
        budget = ref_flops * (2 if run.name.endswith("40K") else 1)
        assert run.flops == pytest.approx(budget, rel=1e-4)
        assert run.flops == pytest.approx(_per_token(run) * run.tokens, rel=1e-12)
    table = format_sweep_table(spec, runs)
    assert "iso-inter_tiny-m-40K" in table and f"{sum(r.flops for r in runs):.3e} FLOPs" in table


def test_flops_budgets_need_no_reference(tmp_path):
    path = _sweep(tmp_path, f"match: F, flops: [1e12, 3.5e12], {SIZES}")
    spec, runs = load_sweep(path)
    assert spec.flops == [1e12, 3.5e12] and spec.tokens is None
    assert len(runs) == 8
    assert {r.name.rsplit("-", 1)[1] for r in runs} == {"1e12", "3.5e12"}
    for run in runs:
        budget = 1e12 if run.name.endswith("-1e12") else 3.5e12
        per_token = _per_token(run)
        assert run.tokens == round(budget / per_token)
        assert abs(run.flops - budget) <= per_token / 2  # rounded to a whole token


def test_without_sizes_runs_are_named_as_before(tmp_path):
    _, runs = load_sweep(_sweep(tmp_path, "match: F, flops: [1e12]"))
    assert [r.name for r in runs] == ["iso-transformer_tiny-1e12", "iso-inter_tiny-1e12"]
    assert [r.size for r in runs] == [None, None]


@pytest.mark.parametrize(
    "body, message",
    [
        # with sizes the reference names a size
        (
            f"match: F, reference: transformer_tiny, tokens: [1M], {SIZES}",
            r"sweep.reference: 'transformer_tiny' is not one of \['transformer_tiny@s', ",
        ),
        (f"match: F, reference: inter_tiny@xl, tokens: [1M], {SIZES}", "sweep.reference: 'inter_tiny@xl'"),
        ("match: F, tokens: [1M], flops: [1e12]", "sweep: give exactly one of tokens"),
        ("match: F", "sweep: give exactly one of tokens"),
        ("match: P, flops: [1e12]", "sweep: flops budgets need match: F"),
        ("match: F, reference: transformer_tiny, flops: [1e12]", "sweep: reference is not used with flops"),
        ("match: F, flops: [-1e12]", "sweep.flops.0: Input should be greater than 0"),
        ("match: F, flops: [1e12], sizes: {}", "sweep.sizes: "),
        ("match: F, flops: [1e12], sizes: {s: []}", r"sweep.sizes: size 's' has no overrides"),
        ("match: F, flops: [1e12], sizes: {a-b: [model.hidden_size=64]}", "sweep.sizes: size label 'a-b'"),
        (
            "match: F, flops: [1e12], sizes: {s: [model.hiden_size=64]}",
            r"sweep.sizes.s \(transformer_tiny.yaml\): override: unknown field model.hiden_size \(did",
        ),
        (
            "match: F, flops: [1e12], sizes: {s: [model.hidden_size=-8]}",
            r"sweep.sizes.s \(transformer_tiny.yaml\): .*model.hidden_size",
        ),
        (
            "match: F, flops: [1e12], sizes: {s: [model.hidden_size=64], s: [model.hidden_size=96]}",
            r"line 1: invalid YAML: duplicate key 's'",
        ),
    ],
)
def test_bad_sizes_and_budgets_name_the_file_and_field(tmp_path, body, message):
    path = _sweep(tmp_path, body)
    with pytest.raises(RecipeError, match=message) as err:
        load_sweep(path)
    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


def test_study_plan_five_kinds_three_sizes_three_budgets():
    spec, runs = load_sweep(STUDY)
    assert spec.match == "F" and len(runs) == 45
    kinds = {k: [r for r in runs if r.kind == k] for k in KINDS}
    assert {k: len(v) for k, v in kinds.items()} == dict.fromkeys(KINDS, 9)
    budgets = sorted(spec.flops or [])
    assert len(budgets) == 3
    for kind, kind_runs in kinds.items():
        sizes = {r.size: r.non_embedding for r in kind_runs}
        assert sorted(sizes) == ["l", "m", "s"]
        assert sizes["s"] < sizes["m"] < sizes["l"], kind
        for run in kind_runs:
            assert 5e6 <= run.non_embedding <= 50e6, run.name
            assert min(abs(run.flops / c - 1) for c in budgets) < 1e-6  # F-matched to a budget
            recipe = load_recipe(run.recipe_path, run.overrides)
            steps = derived(recipe, 1)["total_steps"]
            assert steps > 4 * recipe.train.warmup_steps, run.name  # long enough to decay
    total = sum(r.flops for r in runs)
    assert total == pytest.approx(15 * sum(budgets), rel=1e-6)
    minutes = total / (PEAK_BF16 * STUDY_MFU) / 60
    assert 45 <= minutes <= 65, minutes
    assert f"{total:.3e} FLOPs" in format_sweep_table(spec, runs)


def test_study_dry_run_prints_the_plan_then_one_input_error(tmp_path, capsys):
    """As for any dry run, the plan comes first and a missing corpus is one error line after it
    (the tokenizer is pointed at a path that surely does not exist)."""
    from hybrid_megatron.launch import cli

    code = cli.main([str(STUDY), "--sweep", "--dry-run", f"data.tokenizer={tmp_path}/tok"])
    captured = capsys.readouterr()
    assert code == 2
    assert "sweep study-code-F: 45 runs, F-matched" in captured.out
    for kind in KINDS:
        for size in "sml":
            assert f"study-code-F-{kind}_small_code-{size}-2.25e16 " in captured.out
    assert "total compute of the 45 runs: 4.875e+17 FLOPs" in captured.out
    assert "#SBATCH --array=0-44" in captured.out
    assert "python -m hybrid_megatron.scaling fit " in captured.out  # 9 runs per kind: a law fits
    first = "study-code-F-transformer_small_code-s-2.5e15"
    assert captured.err == f"error: sweep run {first}: data.tokenizer: {tmp_path}/tok does not exist\n"


def _mlflow_frame(runs) -> pd.DataFrame:
    """``mlflow.search_runs``-shaped rows for ``runs`` as the trainer logs them: params
    ``model.num_parameters``, ``model.non_embedding_parameters``, ``train.tokens`` and
    ``train.flops`` from StepMetrics.planned
    (whole steps), tag ``hm.kind``, and a final ``val/loss`` from a Chinchilla-like law."""
    from hybrid_megatron.training.metrics import StepMetrics

    rows = []
    for i, run in enumerate(runs):
        recipe = load_recipe(run.recipe_path, run.overrides)
        planned = StepMetrics(recipe, 1).planned(recipe.model, derived(recipe, 1)["total_steps"])
        n, d = planned["model.non_embedding_parameters"], planned["train.tokens"]
        rows.append(
            {
                "run_id": f"r{i:02d}",
                "params.model.num_parameters": str(planned["model.num_parameters"]),
                "params.model.non_embedding_parameters": str(n),
                "params.train.tokens": str(d),
                "params.train.flops": repr(float(planned["train.flops"])),
                "metrics.val/loss": 1.7 + 400 / n**0.34 + 410 / d**0.28,
                "tags.hm.kind": recipe.model.kind,
                "tags.hm.match": recipe.tracking.match,
                "tags.hm.compare_group": recipe.tracking.compare_group,
            }
        )
    return pd.DataFrame(rows)


def test_fit_and_compare_group_the_study_runs_by_budget_with_their_sizes():
    from hybrid_megatron.scaling.compare import comparison_of_frame
    from hybrid_megatron.scaling.isoflop import fit_isoflop
    from hybrid_megatron.scaling.runs import group_by_kind, points_from_frame

    spec, runs = load_sweep(STUDY)
    frame = _mlflow_frame(runs)
    by_id = dict(zip(frame["run_id"], runs))
    assert set(frame["tags.hm.compare_group"]) == {"study-code-F"}
    per_kind = group_by_kind(points_from_frame(frame))
    assert sorted(per_kind) == sorted(KINDS)
    budgets = sorted(spec.flops or [])
    for kind, rs in per_kind.items():
        iso = fit_isoflop(rs.run_ids, rs.n, rs.c, rs.loss)
        assert len(iso.budgets) == 3, kind
        for budget, c in zip(iso.budgets, budgets):
            members = [by_id[i] for i in budget.run_ids]
            assert budget.flops == pytest.approx(c, rel=0.01)  # whole steps add < 1%
            assert sorted(r.size or "" for r in members) == ["l", "m", "s"]
            assert {r.name.rsplit("-", 1)[1] for r in members} == {members[0].name.rsplit("-", 1)[1]}
            # the fit's N of each run is that run's own size, without the embeddings
            assert sorted(budget.n) == sorted(float(r.non_embedding) for r in members)
            assert len(set(budget.n)) == 3
    table = comparison_of_frame(frame)
    assert table.match == "F" and len(table.rows) == 3
    for row, c in zip(table.rows, budgets):
        assert row.value == pytest.approx(c, rel=0.01)
        assert {k: len(v) for k, v in row.run_ids.items()} == dict.fromkeys(KINDS, 3)


def test_planned_tokens_round_to_whole_steps_within_the_budget_tolerance():
    """The trainer trains whole steps: the logged FLOPs exceed the plan by less than one step,
    far inside the isoFLOP grouping's 5% tolerance even for the study's shortest run."""
    _, runs = load_sweep(STUDY)
    shortest = min(runs, key=lambda r: r.tokens)
    recipe = load_recipe(shortest.recipe_path, shortest.overrides)
    tokens_per_step = recipe.train.global_batch_size * recipe.data.seq_length
    steps = math.ceil(shortest.tokens / tokens_per_step)
    assert steps * tokens_per_step / shortest.tokens - 1 < 0.01


def test_ablation_sweeps_vary_one_thing_each_at_one_budget():
    """The study's ablation sweeps: every run at the one budget, each labelled with its own
    variant; inter's ratios give 5, 3, 2 and 1 attention blocks in the middle of the stack and
    one even spread; intra's vary the branch norm and the fusion; every kind runs dense and MoE
    at about the same tokens (the same active FFN width)."""
    from hybrid_megatron.config.layer_pattern import build_layer_pattern

    sweeps = REPO / "recipes" / "sweeps"
    recipes = {}
    for name in ("inter", "intra", "moe"):
        spec, runs = load_sweep(sweeps / f"study_small_code_{name}_F.yaml")
        assert spec.flops == [7.5e15]
        recipes[name] = [load_recipe(run.recipe_path, run.overrides) for run in runs]
        variants = [(r.model.kind, r.tracking.variant) for r in recipes[name]]
        assert len(set(variants)) == len(variants) and all(v for _, v in variants), variants
        assert {r.tracking.compare_group for r in recipes[name]} == {spec.name}
    patterns = {r.tracking.variant: build_layer_pattern(r.model) for r in recipes["inter"]}
    assert {v: p.count("A") for v, p in patterns.items()} == {
        "1:5-middle": 2,
        "1:1-middle": 5,
        "3:7-middle": 3,
        "1:9-middle": 1,
        "1:5-even": 2,
    }
    assert patterns["1:5-middle"] != patterns["1:5-even"]
    intra = {r.tracking.variant: (r.model.intra.branch_norm, r.model.intra.fusion) for r in recipes["intra"]}
    assert intra == {
        "rmsnorm-concat": ("rmsnorm", "concat"),
        "none-concat": ("none", "concat"),
        "rmsnorm-add": ("rmsnorm", "add"),
        "rmsnorm-subtract": ("rmsnorm", "subtract"),
    }
    by_kind: dict[str, dict] = {}
    for r in recipes["moe"]:
        by_kind.setdefault(r.model.kind, {})[r.tracking.variant] = r
    assert sorted(by_kind) == sorted(KINDS)
    for kind, pair in by_kind.items():
        dense, moe = pair["dense"], pair["moe"]
        assert dense.model.moe is None and moe.model.moe.num_experts == 8, kind
        tokens = [derived(r, 1)["total_steps"] for r in (dense, moe)]
        assert abs(tokens[0] / tokens[1] - 1) < 0.02, (kind, tokens)
