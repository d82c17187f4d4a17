"""Bad model configs raise one error naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hybrid_megatron.config.errors import ModelConfigError
from hybrid_megatron.config.layer_pattern import PatternError, build_layer_pattern
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.config.parallel_layout import check_parallel_layout
from tests.model_configs import tiny_model


def _check(raw: dict, tp=1, ep=1, **parallel):
    check_parallel_layout(ModelConfig(**raw), ParallelConfig(tp=tp, ep=ep, **parallel), tp, ep)


def test_heads_not_divisible_by_tp():
    with pytest.raises(
        ModelConfigError, match=r"model.attention.num_heads: 6 heads do not split over parallel.tp=4"
    ):
        _check(
            tiny_model("transformer", hidden_size=96, attention={"num_heads": 6, "num_query_groups": 2}), tp=4
        )
    with pytest.raises(
        ModelConfigError, match="model.attention.num_query_groups: 2 groups do not split over parallel.tp=4"
    ):
        _check(tiny_model("transformer"), tp=4)
    with pytest.raises(ModelConfigError, match="model.mamba.num_groups"):
        _check(tiny_model("mamba"), tp=4)
    with pytest.raises(ModelConfigError, match="model.intra.dim_ratio"):
        _check(tiny_model("intra", intra={"num_query_groups": 1}), tp=2)
    # 2 x 64 / 16 = 8 SSM heads in a Mamba block, 4 in the all-hybrid intra's Mamba branch
    with pytest.raises(
        ModelConfigError,
        match="model.mamba.num_groups: the Mamba blocks' 8 SSM heads do not split into 3 groups",
    ):
        _check(tiny_model("mamba", mamba={"num_groups": 3}))
    with pytest.raises(
        ModelConfigError,
        match="model.mamba.num_groups: the intra block's Mamba "
        "branch's 4 SSM heads do not split into 8 groups",
    ):
        _check(tiny_model("intra", pattern={"ratio": "1:0"}, mamba={"num_groups": 8}))
    _check(tiny_model("intra", pattern={"ratio": "1:0"}, mamba={"num_groups": 4}))  # fine
    with pytest.raises(
        ModelConfigError, match="model.moe.num_experts: 4 experts do not split over parallel.ep=3"
    ):
        _check(tiny_model("transformer", moe=True), ep=3)
    with pytest.raises(ModelConfigError, match="parallel.sequence_parallel: MoE with tp > 1"):
        _check(tiny_model("transformer", moe=True), tp=2)
    with pytest.raises(ModelConfigError, match="parallel.expert_tp: 1 needs model.moe"):
        _check(tiny_model("intra"), tp=2, sequence_parallel=True, expert_tp=1)
    with pytest.raises(
        ModelConfigError, match="model.fp8_output_layer: each of parallel.tp=2 ranks holds 56 vocabulary rows"
    ):
        _check(
            tiny_model("transformer", impl="te", fp8="hybrid", fp8_output_layer=True, vocab_size=112), tp=2
        )
    with pytest.raises(
        ModelConfigError,
        match="model.fp8_output_layer: each of parallel.tp=1 ranks holds 100 vocabulary rows",
    ):
        _check(tiny_model("transformer", impl="te", fp8="hybrid", fp8_output_layer=True, vocab_size=100))
    _check(
        tiny_model("transformer", impl="te", fp8="hybrid", fp8_output_layer=True, vocab_size=128), tp=2
    )  # fine
    _check(tiny_model("intra", moe=True), tp=2, sequence_parallel=True)  # fine
    _check(tiny_model("intra", moe=True), tp=2, ep=2, sequence_parallel=True, expert_tp=1)  # fine


def test_pattern_length_mismatch():
    with pytest.raises(PatternError, match="model.pattern.layout: has 3 letters but model.num_layers is 4"):
        build_layer_pattern(ModelConfig(**tiny_model("inter", pattern={"layout": "MMA"})))


def test_unknown_fusion_names_the_field():
    with pytest.raises(ValidationError) as err:
        ModelConfig(**tiny_model("intra", intra={"fusion": "multiply"}))
    assert err.value.error_count() == 1
    assert err.value.errors()[0]["loc"] == ("intra", "fusion")
    assert "'add', 'subtract' or 'concat'" in str(err.value)


def test_unknown_field_is_an_error():
    with pytest.raises(ValidationError) as err:
        ModelConfig(**tiny_model("mamba", mamba={"state_dim": 8, "d_conv": 4}))
    assert err.value.errors()[0]["loc"] == ("mamba", "d_conv")


def test_early_attention():
    with pytest.raises(PatternError, match="set model.pattern.allow_early_attention: true"):
        build_layer_pattern(ModelConfig(**tiny_model("inter", pattern={"layout": "AMMM"})))


@pytest.mark.parametrize(
    "raw,field",
    [
        (tiny_model("swa", attention={"sliding_window": None}), "model.attention.sliding_window"),
        (tiny_model("transformer", attention=None), "model.attention: required"),
        (tiny_model("intra", intra={"dim_ratio": "x:1"}), "intra.dim_ratio"),
        ({**tiny_model("transformer"), "moe": {"num_experts": 4, "top_k": 5}}, "moe.top_k"),
        (
            tiny_model("transformer", pattern={"ratio": "1:1"}),
            "model.pattern.ratio: only kinds inter and intra",
        ),
        (tiny_model("transformer", pattern={"layout": "AAAA"}), "model.pattern: only kinds inter and intra"),
        (tiny_model("transformer", impl="local", fp8="hybrid"), "model.fp8: needs impl 'te'"),
        (tiny_model("transformer", fp8_output_layer=True), "model.fp8_output_layer: needs model.fp8"),
        (
            tiny_model("transformer", impl="te", fp8="hybrid", fp8_output_layer=True, tie_embeddings=True),
            "model.fp8_output_layer: needs tie_embeddings false",
        ),
        (tiny_model("intra", flavour="nemotron_h"), "model.flavour: nemotron_h has no intra-layer"),
        (tiny_model("transformer", flavour="gpt"), "flavour"),
        (tiny_model("transformer", num_layers=True), "num_layers\n.*expected a number, got true"),
        (tiny_model("transformer", attention={"rotary_base": float("inf")}), "rotary_base\n.*finite number"),
        (
            {**tiny_model("transformer"), "moe": {"num_experts": 4, "expert_bias": True}},
            "model.moe.expert_bias: needs the sigmoid score function",
        ),
        (
            {
                **tiny_model("transformer", flavour="nemotron_h"),
                "moe": {"num_experts": 4, "expert_bias": True, "score_function": "softmax"},
            },
            "model.moe.expert_bias",
        ),
    ],
)
def test_invalid_model_sections(raw, field):
    with pytest.raises(ValidationError, match=field) as err:
        ModelConfig(**raw)
    assert err.value.error_count() == 1


@pytest.mark.parametrize(
    "raw,message",
    [
        (
            tiny_model("inter", pattern={"layout": "M*-M"}),
            r"letters \['\*', '-'\] not allowed for kind 'inter'.*need model.flavour nemotron_h",
        ),
        (
            tiny_model("inter", flavour="nemotron_h", pattern={"layout": "MA-E"}),
            "model.pattern.layout: letter E \\(an MoE layer\\) needs model.moe",
        ),
        (
            tiny_model("mamba", flavour="nemotron_h", pattern={"layout": "M*M-"}),
            r"letters \['\*'\] not allowed for kind 'mamba'",
        ),
        (
            tiny_model("inter", flavour="nemotron_h", pattern={"ratio": None, "layout": "*MMM"}),
            "attention block at layer 0",
        ),
    ],
)
def test_nemotron_h_layout_errors(raw, message):
    with pytest.raises(PatternError, match=message) as err:
        build_layer_pattern(ModelConfig(**raw))
    assert "\n" not in str(err.value)


def test_nemotron_h_tp_check_covers_attention_only_layers():
    raw = tiny_model("inter", flavour="nemotron_h", pattern={"ratio": None, "layout": "M-*-"})
    with pytest.raises(
        ModelConfigError, match="model.attention.num_query_groups: 2 groups do not split over parallel.tp=4"
    ):
        _check(raw, tp=4)


def test_intra_add_needs_equal_widths(single_rank):
    from tests.conftest import build_single

    with pytest.raises(ValueError, match="intra.fusion: 'add' needs equal branch widths"):
        build_single(tiny_model("intra", intra={"fusion": "add", "dim_ratio": "3:1"}))
