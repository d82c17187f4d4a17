"""Sweep expansion: P- and F-matched token budgets, tags, and the shipped sweep files."""

from __future__ import annotations

import pytest

from hybrid_megatron.accounting import model_flops_per_token
from hybrid_megatron.config import load_recipe
from hybrid_megatron.config.errors import RecipeError
from hybrid_megatron.config.sweep import format_sweep_table, load_sweep
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
    ref = [r for r in runs if "tiny_transformer" in r.name]
    assert sorted(r.tokens for r in ref) == [20_000, 40_000]
    inter = {r.name.rsplit("-", 1)[1]: r.tokens for r in runs if "tiny_inter" in r.name}
    assert inter["40K"] in (2 * inter["20K"] - 1, 2 * inter["20K"], 2 * inter["20K"] + 1)


def test_p_matched_paper_sweep_table():
    spec, runs = load_sweep(SWEEPS / "paper_1b_P.yaml")
    assert {r.tokens for r in runs} == {102_000_000_000}
    assert [r.kind for r in runs] == ["transformer", "swa", "mamba", "inter", "intra"]
    table = format_sweep_table(spec, runs)
    assert "paper-1b-P-1b_inter-102B" in table and "102,000,000,000" in table
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
    bad.write_text("sweep: {name: x, match: F, reference: nope, tokens: [1M], recipes: ["
                   f"{REPO}/recipes/tiny_transformer.yaml]}}\n")
    with pytest.raises(RecipeError, match="sweep.reference: 'nope' is not one of"):
        load_sweep(bad)
    bad.write_text("sweep: {name: x, match: Q, tokens: [1M], recipes: [a.yaml]}\n")
    with pytest.raises(RecipeError, match="sweep.match"):
        load_sweep(bad)
