"""Recipes: every shipped recipe validates and builds; extends/overrides; one clear error per
bad input, naming the dotted path; derived quantities."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from hybrid_megatron.config import RecipeError, derived, format_derived, load_recipe
from hybrid_megatron.config.slurm import parse_minutes
from hybrid_megatron.config.train import parse_count

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SHIPPED = sorted(RECIPES.glob("*.yaml"))  # the bases live in recipes/bases/
KINDS = ["transformer", "swa", "mamba", "inter", "intra"]
SCALES = ["100m", "350m", "1b", "3b"]


def _names() -> set:
    return {p.stem for p in SHIPPED}


def _scale(path: Path) -> str:
    """The ``<scale>`` of a recipe file named ``<kind>_<scale>[_<variant>].yaml``."""
    return path.stem.split("_")[1]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_recipe_file_name_is_kind_scale_variant(path):
    recipe = load_recipe(path)
    kind, scale = path.stem.split("_")[:2]
    assert (kind, scale) == (recipe.model.kind, recipe.tracking.scale)


def test_every_promised_recipe_is_shipped():
    expected = {f"{k}_tiny" for k in KINDS} | {f"{k}_tiny_moe" for k in KINDS}
    expected |= {f"{k}_{s}" for s in SCALES for k in KINDS} | {
        "intra_3b_moe",
        "inter_3b_moe",
        "intra_1b_moe",
        "intra_350m_moe",
    }
    expected |= {"inter_tiny_nemotron_h", "inter_tiny_nemotron_h_moe"}
    assert expected <= _names(), sorted(expected - _names())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    world = recipe.slurm.world_size if _scale(path) != "tiny" else recipe.parallel.tp * recipe.parallel.pp
    values = derived(recipe, world, param_counter=lambda model: None)
    assert values["dp"] * recipe.parallel.tp * recipe.parallel.cp * recipe.parallel.pp == world
    assert values["total_steps"] > recipe.train.warmup_steps
    # Runs of different recipes never share a checkpoint directory.
    assert Path(recipe.checkpoint.dir) == REPO / "runs" / recipe.name / "checkpoints"


def test_tiny_recipes_point_at_the_bundled_corpus():
    stats = json.loads((REPO / "data" / "austen_4k_text_document.stats.json").read_text())
    for path in SHIPPED:
        if _scale(path) != "tiny":
            continue
        recipe = load_recipe(path)
        for prefix in recipe.data.prefixes():
            assert Path(prefix + ".idx").is_file() and Path(prefix + ".bin").is_file(), prefix
        assert Path(recipe.data.tokenizer).exists()
        assert recipe.model.vocab_size == stats["tokenizer"]["vocab_size"]
        assert recipe.train.precision == "fp32" and recipe.model.impl == "local"


def test_demo_and_paper_facts():
    demo = load_recipe(RECIPES / "intra_tiny_moe.yaml")
    assert (demo.model.kind, demo.parallel.tp, demo.parallel.sequence_parallel) == ("intra", 2, True)
    assert demo.model.moe is not None and demo.slurm.world_size == 2
    one_b = {k: load_recipe(RECIPES / f"{k}_1b.yaml") for k in KINDS}
    for recipe in one_b.values():
        assert recipe.model.hidden_size == 2048 and recipe.data.seq_length == 8192
        assert recipe.train.precision == "bf16" and recipe.train.tokens == 102 * 10**9
        assert recipe.tracking.scale == "1b" and recipe.tracking.match == "P"
    assert one_b["inter"].model.pattern.ratio == "1:5"
    assert one_b["intra"].model.intra.dim_ratio == "1:1"
    assert one_b["swa"].model.attention.sliding_window == 1024
    for kind in ("intra", "inter"):
        moe = load_recipe(RECIPES / f"{kind}_3b_moe.yaml")
        assert moe.model.moe.num_experts % moe.parallel.ep == 0 and moe.parallel.sequence_parallel
        assert moe.slurm.gpus_per_node == 8 and moe.slurm.world_size == 32


def _meta_params(recipe) -> int:
    import torch

    from hybrid_megatron.config import ParallelConfig
    from hybrid_megatron.models import build_model
    from hybrid_megatron.training.parallel_setup import setup_model_parallel

    setup_model_parallel(ParallelConfig(), seed=0)  # the RNG streams an earlier test may have reset
    with torch.device("meta"):
        model = build_model(recipe.model, parallel=ParallelConfig())
    embeddings = model.embedding.word_embeddings.weight.numel() + model.output_layer.weight.numel()
    return sum(p.numel() for p in model.parameters()) - embeddings


@pytest.mark.parametrize("scale", SCALES)
def test_paper_scale_recipes_build_and_are_parameter_matched(single_rank, scale):
    # Built on the meta device (no memory), at TP=1: the shapes, not the numbers, are the test.
    counts = {k: _meta_params(load_recipe(RECIPES / f"{k}_{scale}.yaml")) for k in KINDS}
    reference = counts["transformer"]
    for kind, count in counts.items():
        assert abs(count / reference - 1) < 0.05, (kind, count, reference)
    assert counts["swa"] == reference  # a window changes no weights


def test_tiny_moe_recipes_build(single_rank):
    for kind in KINDS:
        recipe = load_recipe(RECIPES / f"{kind}_tiny_moe.yaml")
        assert _meta_params(recipe) > _meta_params(load_recipe(RECIPES / f"{kind}_tiny.yaml"))


def test_tiny_nemotron_h_recipes_are_exportable_nemotron_h_models(single_rank):
    """The NemotronH-flavoured tiny recipes: NemotronH's layer letters, counted exactly, and
    auto-exported as NemotronHForCausalLM."""
    from hybrid_megatron.accounting import count_parameters
    from hybrid_megatron.convert import choose_target

    dense, moe = (
        load_recipe(RECIPES / f"{n}.yaml") for n in ("inter_tiny_nemotron_h", "inter_tiny_nemotron_h_moe")
    )
    assert dense.model.flavour == moe.model.flavour == "nemotron_h"
    assert (dense.model.pattern.layout, moe.model.pattern.layout) == ("M-M*-M-", "MEM*EME")
    for recipe in (dense, moe):
        params = count_parameters(recipe.model)
        embeddings = params.embedding + params.output_layer
        assert _meta_params(recipe) == params.total - embeddings
        assert choose_target(recipe.model)[0] == "nemotron_h"
    assert count_parameters(moe.model).active < count_parameters(moe.model).total


# ---------------------------------------------------------------------------- extends/overrides


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


BASE = textwrap.dedent("""\
    name: base-name
    description: the base
    model:
      kind: inter
      num_layers: 6
      hidden_size: 64
      vocab_size: 128
      max_position_embeddings: 128
      attention: {num_heads: 4}
      pattern: {ratio: "1:5"}
      moe: {num_experts: 4, top_k: 2}
    data:
      tokenizer: tok/tokenizer.json
      blend: [corpus/doc]
      seq_length: 64
    train: {global_batch_size: 8, micro_batch_size: 2, steps: 100, lr: 1.0e-3, warmup_steps: 10}
    checkpoint: {dir: "runs/{name}/ckpt"}
    slurm: {gpus_per_node: 4, env: {A: "1"}}
""")


@pytest.fixture
def chain(tmp_path):
    """base.yaml <- mid/mid.yaml <- mid/leaf.yaml (paths relative to each file)."""
    _write(tmp_path / "base.yaml", BASE)
    _write(
        tmp_path / "mid" / "mid.yaml",
        """\
        extends: ../base.yaml
        name: mid-name
        model: {hidden_size: 128, attention: {num_query_groups: 2}, moe: null}
        train: {lr: 2.0e-3}
        slurm: {env: {B: "2"}}
    """,
    )
    return _write(
        tmp_path / "mid" / "leaf.yaml",
        """\
        extends: mid.yaml
        train: {steps: 50}
    """,
    )


def test_extends_chain_deep_merges_child_wins(chain):
    recipe = load_recipe(chain)
    assert recipe.name == "leaf"  # name is per file: the leaf's stem
    assert recipe.description is None  # description is per file too
    assert recipe.model.hidden_size == 128  # mid beats base
    assert recipe.model.attention.num_heads == 4  # ...while base's siblings survive
    assert recipe.model.attention.num_query_groups == 2
    assert recipe.model.moe is None  # null removes an inherited section
    assert (recipe.train.lr, recipe.train.steps, recipe.train.global_batch_size) == (2e-3, 50, 8)
    assert recipe.slurm.env == {"A": "1", "B": "2"}
    # Relative paths resolve against the loaded (leaf) file's directory, {name} is substituted.
    leaf_dir = chain.parent
    assert recipe.data.tokenizer == str(leaf_dir / "tok" / "tokenizer.json")
    assert recipe.data.blend[0].prefix == str(leaf_dir / "corpus" / "doc")
    assert recipe.checkpoint.dir == str(leaf_dir / "runs" / "leaf" / "ckpt")
    assert recipe.run_dir == str(leaf_dir / "runs" / "leaf")
    assert recipe.tracking.run_name == "leaf" and recipe.slurm.job_name == "leaf"
    assert recipe.tracking_uri() == f"sqlite:///{leaf_dir / 'runs' / 'mlruns.db'}"


def test_overrides_are_yaml_typed_and_create_paths(chain):
    recipe = load_recipe(
        chain,
        [
            "train.lr=3e-4",
            "train.tokens=1.5M",
            "train.steps=null",
            "model.moe={num_experts: 2, top_k: 1}",
            "slurm.setup=[echo a, echo b]",
            "slurm.time=01:30:00",
            "tracking.tags.seed=7",
            "data.blend.0=other/doc",
            "name=renamed",
        ],
    )
    assert recipe.train.lr == 3e-4 and recipe.train.steps is None and recipe.train.tokens == 1_500_000
    assert (recipe.model.moe.num_experts, recipe.model.moe.top_k) == (2, 1)
    assert recipe.slurm.setup == ["echo a", "echo b"] and recipe.slurm.time == 90
    assert recipe.tracking.tags == {"seed": "7"}
    assert recipe.data.blend[0].prefix == str(chain.parent / "other" / "doc")
    assert recipe.name == "renamed" and recipe.checkpoint.dir.endswith("runs/renamed/ckpt")
    assert recipe.overrides[0] == "train.lr=3e-4"


def test_resolved_recipe_round_trips(chain, tmp_path):
    recipe = load_recipe(chain, ["train.lr=5e-4"])
    dumped = _write(tmp_path / "resolved.yaml", recipe.to_yaml())
    again = load_recipe(dumped)
    assert again.to_dict() == recipe.to_dict()


def test_extends_cycle_is_an_error(tmp_path):
    _write(tmp_path / "a.yaml", "extends: b.yaml\n")
    _write(tmp_path / "b.yaml", "extends: c.yaml\n")
    _write(tmp_path / "c.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(tmp_path / "a.yaml")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'a.yaml'}: extends cycle: "), message
    chain = message.split("extends cycle: ", 1)[1].split(" -> ")
    assert [Path(p).name for p in chain] == ["a.yaml", "b.yaml", "c.yaml", "a.yaml"]


# ---------------------------------------------------------------------------- error messages


def _error(path, overrides=()) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    message = str(err.value)
    # One clear line; none of pydantic's machinery in the user's face.
    assert "\n" not in message, message
    assert "pydantic" not in message and "validation error" not in message.lower(), message
    return message


def test_unknown_field_names_file_and_path(tmp_path):
    path = _write(tmp_path / "x.yaml", BASE.replace("hidden_size: 64", "hiden_size: 64"))
    message = _error(path)
    assert message.startswith(f"{path}: unknown field model.hiden_size"), message
    assert "did you mean hidden_size" in message


def test_unknown_field_in_base_names_the_base(chain):
    base = chain.parent.parent / "base.yaml"
    base.write_text(base.read_text().replace("warmup_steps: 10", "warmup_stpes: 10"))
    message = _error(chain)
    assert message.startswith(f"{base}: unknown field train.warmup_stpes"), message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.intra.fusion=sum", "override: model.intra.fusion: 'sum' is not one of add, subtract, concat"),
        ("train.schedule=linear", "override: train.schedule: 'linear' is not one of cosine, wsd, constant"),
        ("train.precision=fp16", "override: train.precision: 'fp16' is not one of fp32, bf16"),
        ("tracking.match=X", "override: tracking.match: 'X' is not one of P, F"),
        ("model.kind=rnn", "override: model.kind: 'rnn' is not one of transformer, swa, mamba, inter, intra"),
        ("train.lr=-1", "override: train.lr: input should be greater than 0 (got -1)"),
        ("train.global_batch_size=abc", "override: train.global_batch_size: "),
        ("train.tokens=1e9", "override: train: give exactly one of train.steps and train.tokens"),
        ("train.min_lr=1", "override: train.min_lr: 1.0 is larger than train.lr 0.001"),
        ("slurm.time=1:2:3:4", "override: slurm.time: expected minutes or [D-]HH:MM:SS"),
        ("model.pattern.layout=AMMMMM", "override: model.pattern: attention block at layer 0"),
        ("data.seq_length=4096", "override: data.seq_length: 4096 exceeds model.max_position_embeddings 128"),
        ("parallel.tp=2", "parallel.sequence_parallel: MoE with tp > 1 needs it set to true"),
        ("parallel.ep=3", "model.moe.num_experts: 4 experts do not split over parallel.ep=3"),
        ("parallel.expert_tp=3", "parallel.expert_tp: 3 must be 1 (whole experts) or parallel.tp=1"),
        ("parallel.expert_tp=0", "override: parallel.expert_tp: input should be greater than 0"),
        ("train.adam_moments=bf16", "override: train.adam_moments: bf16 moments need train.precision bf16"),
        (
            "model.moe.experts=fast",
            "override: model.moe.experts: 'fast' is not one of grouped, sequential, te_grouped",
        ),
        ("name=has space", "override: name: 'has space' must be letters"),
        ("train", "override 'train': expected KEY.PATH=VALUE"),
        ("extends=x.yaml", "override 'extends=x.yaml': extends cannot be overridden"),
    ],
)
def test_each_bad_input_is_one_message_naming_the_path(tmp_path, override, expected):
    path = _write(tmp_path / "x.yaml", BASE)
    message = _error(path, [override])
    assert expected in message, message


def test_missing_required_field(tmp_path):
    path = _write(tmp_path / "x.yaml", BASE.replace(" lr: 1.0e-3,", ""))
    assert _error(path) == f"{path}: train.lr: required field is missing"


def test_file_level_errors(tmp_path):
    assert _error(tmp_path / "nope.yaml").endswith("nope.yaml: recipe file not found")
    path = _write(tmp_path / "dup.yaml", BASE + "train: {steps: 3}\n")
    assert "duplicate key 'train'" in _error(path)
    path = _write(tmp_path / "bad.yaml", "model: [unclosed\n")
    assert "invalid YAML" in _error(path)
    path = _write(tmp_path / "list.yaml", "- a\n- b\n")
    assert "a recipe is a mapping of sections" in _error(path)
    path = _write(tmp_path / "orphan.yaml", "extends: missing.yaml\n")
    assert "extends: missing.yaml not found" in _error(path)
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    assert _error(path) == f"{path}: not a UTF-8 text file (byte 9)"


def test_several_problems_are_one_line_each(tmp_path):
    path = _write(tmp_path / "x.yaml", BASE.replace("hidden_size: 64", "hidden_size: 64\n  colour: red"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["train.schedule=linear"])
    lines = str(err.value).splitlines()
    assert lines == [
        f"{path}: unknown field model.colour (did you mean flavour?)",
        "override: train.schedule: 'linear' is not one of cosine, wsd, constant",
    ]


def test_yaml_numbers_are_yaml_1_2(tmp_path):
    text = BASE.replace("lr: 1.0e-3", "lr: 3e-4").replace(
        "gpus_per_node: 4", "gpus_per_node: 4, time: 04:00:00"
    )
    recipe = load_recipe(_write(tmp_path / "x.yaml", text))
    assert recipe.train.lr == pytest.approx(3e-4) and recipe.slurm.time == 240


def test_parsers():
    assert parse_count("102B") == 102 * 10**9 and parse_count("1.5e9") == 1_500_000_000
    assert parse_count("500_000") == 500_000 and parse_count(2e6) == 2_000_000
    with pytest.raises(ValueError):
        parse_count(1.5)
    assert [parse_minutes(v) for v in (30, "30", "1:30", "2:00:00", "1-0", "1-02:30", "0:0:59")] == [
        30,
        30,
        2,
        120,
        1440,
        1590,
        1,
    ]


# ---------------------------------------------------------------------------- derived


def test_derived_tiny_demo():
    recipe = load_recipe(RECIPES / "intra_tiny_moe.yaml")

    class Report:  # a counter returns a report; derived() keeps its headline
        def headline(self):
            return {"total": 123, "active": 100}

    values = derived(recipe, 2, param_counter=lambda model: Report())
    assert {
        k: values[k] for k in ("dp", "grad_accum_steps", "tokens_per_step", "total_steps", "total_tokens")
    } == {
        "dp": 1,
        "grad_accum_steps": 2,
        "tokens_per_step": 8 * 128,
        "total_steps": 60,
        "total_tokens": 60 * 1024,
    }
    assert values["layer_pattern"] == "MHMH" and values["params"] == {"total": 123, "active": 100}
    text = format_derived(values)
    assert "global 8 = micro 4 x dp 1 x grad accumulation 2" in text
    assert "60 steps, 61,440 tokens" in text and "total 123, active 100" in text


def test_derived_token_budget_rounds_up_to_whole_steps():
    recipe = load_recipe(RECIPES / "inter_1b.yaml")
    values = derived(recipe, 16, param_counter=lambda model: None)
    per_step = 256 * 8192
    assert values["dp"] == 16 and values["grad_accum_steps"] == 8
    assert values["total_steps"] == math.ceil(102e9 / per_step) == 48638
    assert values["total_tokens"] == 48638 * per_step >= 102 * 10**9
    assert values["params"] is None and "params    n/a" in format_derived(values)
    # On 8 nodes instead of 2: dp 64 -> grad accumulation 2.
    assert derived(recipe, 64, param_counter=lambda m: None)["grad_accum_steps"] == 2


@pytest.mark.parametrize(
    "world, overrides, expected",
    [
        (3, [], "parallel: world size 3 is not divisible by tp*cp*pp = 2*1*1 = 2"),
        (6, [], "train.global_batch_size: 8 is not divisible by train.micro_batch_size * dp = 4 * 3 = 12"),
        # megatron-core splits experts over tp ranks by default: tp 2 x ep 2 needs 4 ranks ...
        (
            2,
            ["parallel.ep=2"],
            "parallel.ep: ep 2 x expert tp 2 = 4 ranks per expert group do not divide "
            "dp*cp*tp = 1*1*2 on 2 ranks",
        ),
        (
            2,
            ["parallel.ep=4", "parallel.expert_tp=1"],
            "parallel.ep: 4 does not divide dp*cp*tp = 1*1*2 on 2 ranks",
        ),
    ],
)
def test_derived_errors_name_the_field(world, overrides, expected):
    recipe = load_recipe(RECIPES / "intra_tiny_moe.yaml", overrides)
    with pytest.raises(RecipeError) as err:
        derived(recipe, world, param_counter=lambda model: None)
    assert str(err.value).startswith(expected), str(err.value)


def test_whole_experts_fold_over_the_tp_ranks():
    # ... unless the experts stay whole (expert_tp 1): then ep 2 fits the same 2 ranks as tp 2.
    recipe = load_recipe(RECIPES / "intra_tiny_moe.yaml", ["parallel.ep=2", "parallel.expert_tp=1"])
    values = derived(recipe, 2, param_counter=lambda model: None)
    assert (values["tp"], values["ep"], values["expert_tp"], values["dp"]) == (2, 2, 1, 1)
    assert "ranks     2 = tp 2 x pp 1 x dp 1 (ep 2, expert tp 1)" in format_derived(values)


def test_derived_warmup_longer_than_token_budget():
    recipe = load_recipe(RECIPES / "transformer_tiny.yaml", ["train.steps=null", "train.tokens=8192"])
    with pytest.raises(RecipeError, match=r"train.warmup_steps: 10 must be smaller than the 8 total steps"):
        derived(recipe, 1, param_counter=lambda model: None)
