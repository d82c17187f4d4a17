"""Layer-pattern builder: ratios, placements, explicit layouts, the early-attention rule, PP split."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybrid_megatron.config import RecipeError, load_recipe
from hybrid_megatron.config.layer_pattern import PatternError, build_layer_pattern, split_pattern
from hybrid_megatron.config.model import ModelConfig
from tests.model_configs import tiny_model


def cfg(kind, num_layers=12, **pattern):
    raw = tiny_model(kind, num_layers=num_layers)
    raw.pop("pattern", None)
    if pattern:
        raw["pattern"] = pattern
    return ModelConfig(**raw)


def test_pure_kinds():
    assert build_layer_pattern(cfg("transformer", 5)) == "AAAAA"
    assert build_layer_pattern(cfg("swa", 3)) == "AAA"
    assert build_layer_pattern(cfg("mamba", 4)) == "MMMM"


def test_inter_ratio_even_placement():
    # 1:5 over 12 layers: 2 attention blocks, each ending its group of 6.
    assert build_layer_pattern(cfg("inter", 12, ratio="1:5")) == "MMMMMAMMMMMA"
    # 1:1 over 8 layers alternates, starting with Mamba.
    assert build_layer_pattern(cfg("inter", 8, ratio="1:1")) == "MAMAMAMA"
    p = build_layer_pattern(cfg("inter", 24, ratio="1:3"))
    assert p.count("A") == 6 and p.count("M") == 18


def test_inter_middle_placement():
    assert build_layer_pattern(cfg("inter", 12, ratio="1:5", placement="middle")) == "MMMMMAAMMMMM"
    assert build_layer_pattern(cfg("inter", 8, ratio="1:1", placement="middle")) == "MMAAAAMM"


def test_intra_defaults_and_ratio():
    assert build_layer_pattern(cfg("intra", 6)) == "HHHHHH"
    assert build_layer_pattern(cfg("intra", 8, ratio="1:1")) == "MHMHMHMH"


def test_explicit_layout():
    assert build_layer_pattern(cfg("inter", 6, layout="mmamma")) == "MMAMMA"
    with pytest.raises(PatternError, match="model.pattern.layout: has 5 letters but model.num_layers is 6"):
        build_layer_pattern(cfg("inter", 6, layout="MMAMM"))
    with pytest.raises(PatternError, match=r"letters \['H'\] not allowed for kind 'inter'"):
        build_layer_pattern(cfg("inter", 4, layout="MHMA"))


def test_early_attention_rule():
    with pytest.raises(PatternError, match="allow_early_attention"):
        build_layer_pattern(cfg("inter", 8, layout="AMMMMMMM"))
    # 16 layers guard the first 2 by default.
    with pytest.raises(PatternError, match="attention block at layer 1 is within the first 2"):
        build_layer_pattern(cfg("inter", 16, layout="MA" + "M" * 14))
    assert build_layer_pattern(cfg("inter", 8, layout="AMMMMMMM", allow_early_attention=True))[0] == "A"
    assert build_layer_pattern(cfg("inter", 16, layout="MA" + "M" * 14, early_layers=1))[1] == "A"


def test_ratio_errors():
    with pytest.raises(ValueError, match="model.pattern.ratio"):
        build_layer_pattern(cfg("inter", 8, ratio="one:five"))
    with pytest.raises(PatternError, match="leaves no A block"):
        build_layer_pattern(cfg("inter", 4, ratio="1:20"))


@pytest.mark.parametrize("kind, block", [("inter", "attention"), ("intra", "hybrid")])
def test_a_ratio_without_the_kinds_own_block_is_refused(kind, block):
    """``ratio: 0:1`` asks for Mamba blocks only, which is kind mamba, not a hybrid."""
    with pytest.raises(ValueError, match=f"model.pattern.ratio: 0:1 leaves no {block} block.*kind mamba"):
        cfg(kind, 8, ratio="0:1")
    assert build_layer_pattern(cfg(kind, 8, ratio="1:1")).count("M") == 4


@pytest.mark.parametrize(
    "kind, layout, block, flavour",
    [
        ("inter", "MMMM", "attention", "llama"),
        ("intra", "mmmm", "hybrid", "llama"),
        ("inter", "M-ME", "attention", "nemotron_h"),
    ],
)
def test_a_layout_without_the_kinds_own_block_is_refused(kind, layout, block, flavour):
    """An explicit layout of Mamba (and FFN-only) blocks is refused like ``ratio: 0:1``."""
    raw = tiny_model(kind, num_layers=4, flavour=flavour, moe=flavour == "nemotron_h")
    raw["pattern"] = {"layout": layout}
    with pytest.raises(
        PatternError,
        match=f"model.pattern.layout: {layout.upper()} has no {block} block, and kind {kind} needs at "
        "least one; a model of Mamba blocks only is kind mamba",
    ):
        build_layer_pattern(ModelConfig(**raw))
    # One block of the kind's own makes it a hybrid again.
    own = "*" if flavour == "nemotron_h" else ("A" if kind == "inter" else "H")
    raw["pattern"] = {"layout": layout[:3] + own}
    assert build_layer_pattern(ModelConfig(**raw)) == (layout[:3] + own).upper()


def test_recipe_validation_refuses_both_mamba_only_spellings():
    """The recipe check before submitting refuses the layout as it does the ratio, in one message."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "inter_tiny.yaml"
    for overrides, field in (
        (["model.pattern.ratio=0:1"], "model.pattern.ratio: 0:1 leaves no attention block"),
        (
            ["model.pattern.ratio=null", "model.pattern.layout=MMMM"],
            "model.pattern.layout: MMMM has no attention block",
        ),
    ):
        with pytest.raises(RecipeError, match=f"{field}, and kind inter needs at least one") as err:
            load_recipe(recipe, overrides)
        assert str(err.value).count("needs at least one") == 1
    layout = ["model.pattern.ratio=null", "model.pattern.layout=MMAM"]
    assert load_recipe(recipe, layout).model.pattern.layout == "MMAM"


def test_pipeline_split():
    assert split_pattern("MMAMMA", 2) == ["MMA", "MMA"]
    assert split_pattern("MMAMMA", 3, [1, 3, 2]) == ["M", "MAM", "MA"]
    with pytest.raises(PatternError, match="parallel.pp: 6 layers do not split evenly over 4"):
        split_pattern("MMAMMA", 4)
    with pytest.raises(PatternError, match="parallel.pipeline_stage_layers"):
        split_pattern("MMAMMA", 2, [2, 3])


def test_nemotron_h_letters():
    """Flavour nemotron_h: single-sublayer letters (* attention, - MLP, E MoE) in layouts of
    kinds inter, transformer and mamba; lower case and spaces are fine; kinds keep their
    default patterns."""

    def nemo(kind, layout=None, **extra):
        raw = tiny_model(
            kind,
            num_layers=len(layout.replace(" ", "")) if layout else 4,
            flavour="nemotron_h",
            moe=True,
            **extra,
        )
        raw.pop("pattern", None)
        if layout:
            raw["pattern"] = {"layout": layout, "allow_early_attention": True}
        return ModelConfig(**raw)

    assert build_layer_pattern(nemo("inter", "M-M* -e")) == "M-M*-E"
    assert build_layer_pattern(nemo("transformer", "*-*E")) == "*-*E"
    assert build_layer_pattern(nemo("mamba", "MEM-")) == "MEM-"
    assert build_layer_pattern(nemo("transformer")) == "AAAA"
    assert build_layer_pattern(nemo("inter", pattern=None)) == "MMMA"  # default ratio 1:5 -> 1 of 4
