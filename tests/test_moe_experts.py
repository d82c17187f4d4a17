"""GroupedExperts (grouped GEMMs, token counts on the device) against megatron-core's
SequentialMLP: the padded group layout, the same outputs and gradients on the same weights, and
checkpoints that move between the two in both directions mid-run."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.conftest import build_single
from tests.model_configs import tiny_model
from tests.training_helpers import REPO, read_losses


def test_padded_group_layout_places_each_group_at_an_aligned_start():
    from hybrid_megatron.models.moe import padded_group_layout

    counts = torch.tensor([3, 0, 5, 1])
    destination, offsets, rows = padded_group_layout(counts, 9, alignment=4)
    # groups padded to 4, 4 (empty: one block of zeros), 8, 4 rows: starts 0, 4, 8, 16; the
    # last one takes the spare rows
    assert destination.tolist() == [0, 1, 2, 8, 9, 10, 11, 12, 16]
    assert offsets.tolist() == [4, 8, 16, 28] and offsets.dtype == torch.int32
    assert rows == 28  # 9 + 4 x 4 rounded up to 4: a bound that does not depend on the counts
    destination, offsets, rows = padded_group_layout(counts, 9, alignment=1)
    assert destination.tolist() == list(range(9)) and offsets.tolist() == [3, 3, 8, 9] and rows == 9


@pytest.mark.parametrize("seed", range(20))
def test_padded_groups_are_aligned_never_empty_and_fit_the_fixed_buffer(seed):
    from hybrid_megatron.models.moe import padded_group_layout

    gen = torch.Generator().manual_seed(seed)
    groups, rows = 8, int(torch.randint(1, 200, (1,), generator=gen))
    # routings from balanced to everything in one group, so most groups are often empty
    share = torch.rand(groups, generator=gen) ** float(torch.randint(1, 12, (1,), generator=gen))
    counts = torch.bincount(torch.multinomial(share, rows, replacement=True, generator=gen), minlength=groups)
    destination, offsets, buffer_rows = padded_group_layout(counts, rows, alignment=16)
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    assert buffer_rows == -(-(rows + groups * 16) // 16) * 16 and ends[-1] == buffer_rows
    for g in range(groups):
        assert starts[g] % 16 == 0 and ends[g] - starts[g] >= max(16, int(counts[g]))
    placed = destination.tolist()
    assert len(set(placed)) == rows  # no two rows share a slot
    group_of_row = torch.repeat_interleave(torch.arange(groups), counts).tolist()
    for row, g in zip(placed, group_of_row, strict=True):
        assert starts[g] <= row < starts[g] + int(counts[g])  # a group's rows first, in order


def _model_pair(cfg: dict, seed: int = 3):
    """The same model built with sequential and with grouped experts, on the same weights."""
    from megatron.core.transformer.moe import moe_utils

    moe_utils.get_moe_layer_wise_logging_tracker().clear()  # sized by the first MoE model run
    models = {}
    for experts in ("sequential", "grouped"):
        models[experts] = build_single({**cfg, "moe": {**cfg["moe"], "experts": experts}}, seed=seed)
    models["grouped"].load_state_dict(models["sequential"].state_dict())
    return models["sequential"], models["grouped"]


def _randomise(model, seed: int) -> None:
    """Every weight drawn afresh (so that experts, norms and routers all differ from their init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if p.dim() == 1 else 0.0))


def _loss_and_grads(model, ids):
    model.zero_grad()
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    loss = model(ids, pos, None, labels=ids).float().mean()
    loss.backward()
    # gradients under state-dict names, so both expert layouts are compared per expert
    grads = {}
    for name, p in model.named_parameters():
        if name.endswith(("experts.weight1", "experts.weight2")):
            fc = "linear_fc1" if name.endswith("1") else "linear_fc2"
            for e in range(p.shape[0]):
                grads[f"{name[: -len('weight1')]}local_experts.{e}.{fc}.weight"] = p.grad[e]
        else:
            grads[name] = p.grad
    return loss.item(), grads


@pytest.mark.parametrize("alignment", [None, 8], ids=["unpadded", "padded-to-8"])
@pytest.mark.parametrize("kind", ["inter", "intra", "nemotron_h"])
def test_grouped_experts_match_sequential(single_rank, kind, alignment):
    """Loss and every parameter's gradient (each expert's too) equal SequentialMLP's, gated
    SwiGLU (llama) and squared-ReLU (nemotron_h) experts, with and without padded groups."""
    if kind == "nemotron_h":
        cfg = tiny_model(
            "inter",
            moe=True,
            flavour="nemotron_h",
            pattern={"ratio": None, "layout": "M*AE", "allow_early_attention": True},
        )
    else:
        cfg = tiny_model(kind, moe=True)
    sequential, grouped = _model_pair(cfg)
    _randomise(sequential, seed=5)
    grouped.load_state_dict(sequential.state_dict())
    from hybrid_megatron.models.moe import GroupedExperts

    experts = [m for m in grouped.modules() if isinstance(m, GroupedExperts)]
    assert experts, "the grouped model has no GroupedExperts"
    for m in experts:
        m.alignment = alignment
    ids = torch.randint(0, cfg["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    loss_s, grads_s = _loss_and_grads(sequential, ids)
    loss_g, grads_g = _loss_and_grads(grouped, ids)
    assert loss_g == pytest.approx(loss_s, rel=1e-6)
    assert grads_g.keys() == grads_s.keys()
    for name, g in grads_s.items():
        torch.testing.assert_close(grads_g[name], g, rtol=1e-5, atol=1e-6, msg=name)
    expert_grads = [g for name, g in grads_s.items() if ".local_experts." in name]
    assert expert_grads and all(g.abs().sum() > 0 for g in expert_grads[:2])


def test_plain_state_dict_names_each_expert_as_sequential_does(single_rank):
    sequential, grouped = _model_pair(tiny_model("inter", moe=True))

    def weights(model):
        return {k for k in model.state_dict() if not k.endswith("_extra_state")}

    assert weights(grouped) == weights(sequential)
    assert any(".local_experts.3.linear_fc1.weight" in k for k in weights(grouped))
    broken = dict(sequential.state_dict())
    del broken[next(k for k in broken if k.endswith("local_experts.1.linear_fc2.weight"))]
    result = grouped.load_state_dict(broken, strict=False)
    assert any(k.endswith("local_experts.1.linear_fc2.weight") for k in result.missing_keys)


def test_old_recipes_grouped_gemm_flag_reads_as_the_experts_choice():
    from pydantic import ValidationError

    from hybrid_megatron.config.model import MoEConfig

    assert MoEConfig(num_experts=4).experts == "grouped"
    assert MoEConfig(num_experts=4, grouped_gemm=True).experts == "te_grouped"
    assert MoEConfig(num_experts=4, grouped_gemm=False).experts == "sequential"
    with pytest.raises(ValidationError, match="grouped_gemm: expected true or false"):
        MoEConfig(num_experts=4, grouped_gemm="yes")


_RUN = (
    "data.seq_length=64",
    "train.global_batch_size=4",
    "train.steps=6",
    "train.warmup_steps=1",
    "train.log_interval=1",
    "train.eval_interval=0",
    "checkpoint.interval=3",
    "checkpoint.keep_last=5",
    "train.deterministic=true",
    "tracking.enabled=false",
    "model.num_layers=2",
    "parallel.tp=1",
    "parallel.sequence_parallel=false",
)


@pytest.mark.parametrize("saved,resumed", [("sequential", "grouped"), ("grouped", "sequential")])
def test_checkpoints_move_between_expert_implementations(single_rank, tmp_path, saved, resumed):
    """A run saved with one expert implementation at step 3 resumes with the other (weights and
    Adam states), and steps 4-6 give the losses of the uninterrupted run (fp32, 1e-5)."""
    from hybrid_megatron.config import load_recipe
    from hybrid_megatron.training.entry import train

    recipe = str(REPO / "recipes" / "intra_tiny_moe.yaml")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"

    def run(run_dir, experts, *extra):
        train(
            load_recipe(
                recipe,
                [f"checkpoint.dir={run_dir}/checkpoints", *_RUN, f"model.moe.experts={experts}", *extra],
            )
        )

    run(ref_dir, saved)
    reference = read_losses(ref_dir)
    shutil.copytree(ref_dir / "checkpoints" / "step_00000003", cut_dir / "from" / "step_00000003")
    run(cut_dir, resumed, f"checkpoint.resume={cut_dir}/from/step_00000003")
    continued = read_losses(cut_dir)
    assert sorted(continued) == [4, 5, 6]
    for step in continued:
        a, b = float.fromhex(continued[step]), float.fromhex(reference[step])
        assert abs(a - b) < 1e-5 * max(1.0, abs(b)), (step, a, b)


def test_fp8_grouped_experts_train_like_bf16_within_e4m3_rounding(single_rank):
    """With FP8 on, the experts' GEMMs are quantised (the loss moves a little) and the model's
    loss and expert gradients stay within E4M3's rounding of the unquantised ones."""
    from hybrid_megatron.models.moe import GroupedExperts

    cfg = tiny_model("inter", moe=True)
    sequential, grouped = _model_pair(cfg)
    _randomise(sequential, seed=5)
    grouped.load_state_dict(sequential.state_dict())
    experts = [m for m in grouped.modules() if isinstance(m, GroupedExperts)]
    assert experts and experts[0].weight1.shape[1] % 16 == 0 and experts[0].weight1.shape[2] % 16 == 0
    ids = torch.randint(0, cfg["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    loss_ref, grads_ref = _loss_and_grads(grouped, ids)
    for m in experts:
        m.fp8 = True
    loss_fp8, grads_fp8 = _loss_and_grads(grouped, ids)
    assert loss_fp8 != loss_ref
    assert loss_fp8 == pytest.approx(loss_ref, rel=2e-2)
    rels = [
        ((grads_fp8[name] - g).norm() / g.norm()).item()
        for name, g in grads_ref.items()
        if ".local_experts." in name
    ]
    # a product of two E4M3-rounded operands: about 6% per expert, none far off
    assert len(rels) == 32 and sum(rels) / len(rels) < 0.08 and max(rels) < 0.15, rels


def _fp8_grouped_model():
    """The tiny inter MoE model with grouped experts, randomised, its experts switched to FP8:
    (recipe dict, model, the GroupedExperts modules)."""
    from hybrid_megatron.models.moe import GroupedExperts

    cfg = tiny_model("inter", moe=True)
    model = build_single({**cfg, "moe": {**cfg["moe"], "experts": "grouped"}}, seed=3)
    _randomise(model, seed=5)
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    for m in experts:
        m.fp8 = True
    return cfg, model, experts


def test_fp8_experts_never_read_rows_a_grouped_gemm_leaves_unwritten(single_rank, monkeypatch):
    """On a GPU the grouped GEMM leaves output rows past the last group's end unwritten (whatever
    the allocator held, NaN included), and FP8's weight-gradient scales reduce over every row of
    the buffer: with the groups padded to 16 rows, the reference GEMM here fills such rows with
    NaN, and the loss and every gradient stay those of the unpadded experts."""
    from hybrid_megatron.ops import fp8_grouped_mm as f8

    cfg, model, experts = _fp8_grouped_model()
    ids = torch.randint(0, cfg["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    loss_ref, grads_ref = _loss_and_grads(model, ids)

    reference = f8._reference_grouped_mm

    def leaves_rows_unwritten(a, b, scale_a, scale_b, offs, out_dtype):
        out = reference(a, b, scale_a, scale_b, offs, out_dtype)
        if b.dim() == 3:  # rows of ``a`` in groups: rows past the last offset are not computed
            out[int(offs[-1]) :] = float("nan")
        return out

    monkeypatch.setattr(f8, "_reference_grouped_mm", leaves_rows_unwritten)
    for m in experts:
        m.alignment = 16
    loss, grads = _loss_and_grads(model, ids)
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    for name, g in grads_ref.items():
        assert torch.isfinite(grads[name]).all(), name
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), name


def test_fp8_weight_copies_are_made_once_per_step_and_reused_by_its_micro_batches(single_rank, monkeypatch):
    """Under FP8 the experts quantise their weights on a step's first micro-batch (megatron-core's
    schedules flag it through ``set_is_first_microbatch``) and reuse them for the others, with the
    same numbers as quantising afresh; a weight written in place is quantised again."""
    from hybrid_megatron.models import moe

    cfg, model, experts = _fp8_grouped_model()
    made, quantise_weight = [], moe.quantise_weight
    monkeypatch.setattr(moe, "quantise_weight", lambda w: made.append(w) or quantise_weight(w))
    ids = torch.randint(0, cfg["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))

    def first_microbatch():
        # megatron-core's own hook, which acts only under an FP8 config
        model.config.fp8, fp8 = "hybrid", model.config.fp8
        try:
            model.set_is_first_microbatch()
        finally:
            model.config.fp8 = fp8

    first_microbatch()
    loss_first, grads_first = _loss_and_grads(model, ids)
    assert len(made) == 2 * len(experts)  # weight1 and weight2 of every MoE layer
    loss_second, grads_second = _loss_and_grads(model, ids)  # the step's second micro-batch
    assert len(made) == 2 * len(experts)  # nothing quantised again
    assert loss_second == loss_first
    assert all(torch.equal(grads_second[n], g) for n, g in grads_first.items())

    with torch.no_grad():  # an optimizer writing the weights in place
        for m in experts:
            m.weight1.mul_(0.5)
    loss_written, _ = _loss_and_grads(model, ids)
    assert len(made) == 3 * len(experts)  # weight1 quantised again, weight2 reused
    first_microbatch()
    loss_fresh, _ = _loss_and_grads(model, ids)
    assert len(made) == 5 * len(experts)
    assert loss_written == loss_fresh != loss_first


def test_fp8_experts_never_read_the_gradient_of_an_empty_group(single_rank, monkeypatch):
    """A grouped GEMM leaves a group's output undefined when the group contracts over no rows,
    and the padded layout spares the FP8 weight gradient its masking pass by never leaving a group
    empty: with the reference kernel writing NaN for empty groups, experts routed everything to
    one expert give the gradients of the unpadded experts (whose empty groups are masked)."""
    from hybrid_megatron.ops import fp8_grouped_mm as f8

    _, _, experts = _fp8_grouped_model()
    layer = experts[0]
    gen = torch.Generator().manual_seed(1)
    rows = 40
    tokens = torch.randn(rows, layer.config.hidden_size, generator=gen)
    probs = torch.rand(rows, generator=gen)
    counts = torch.zeros(layer.num_local_experts, dtype=torch.int64)
    counts[1] = rows  # every other expert empty

    def gradients():
        layer.zero_grad()
        x = tokens.clone().requires_grad_(True)
        out, _ = layer(x, counts, probs)
        (out.float() ** 2).sum().backward()
        return [x.grad, layer.weight1.grad.clone(), layer.weight2.grad.clone()]

    layer.alignment = 1
    reference = gradients()
    assert not reference[1][0].any() and reference[1][1].any()  # expert 0 saw no rows

    kernel = f8._reference_grouped_mm

    def undefined_for_empty_groups(a, b, scale_a, scale_b, offs, out_dtype):
        out = kernel(a, b, scale_a, scale_b, offs, out_dtype)
        if b.dim() == 2:  # groups along the contraction: an empty group's block is not written
            sizes = torch.diff(offs, prepend=offs.new_zeros(1))
            out[sizes == 0] = float("nan")
        return out

    monkeypatch.setattr(f8, "_reference_grouped_mm", undefined_for_empty_groups)
    layer.alignment = 16
    padded = gradients()
    for got, want in zip(padded, reference, strict=True):
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
