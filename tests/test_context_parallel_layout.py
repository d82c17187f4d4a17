"""Context parallelism's pure facts: the 2 x CP chunk order each rank holds, and the layout and
sequence checks' messages (no process group beyond one rank)."""

from __future__ import annotations

import pytest

from hybrid_megatron.config import RecipeError, derived, format_derived, load_recipe
from hybrid_megatron.config.errors import ModelConfigError
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.config.parallel_layout import check_parallel_layout, check_sequence_split
from tests.model_configs import tiny_model
from tests.test_recipes import RECIPES


class _Group:
    """A stand-in CP group of ``size`` ranks seen from ``rank`` (only size() and rank())."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_each_rank_holds_its_two_chunks_of_megatron_order(cp, single_rank):
    import torch
    from megatron.core.utils import get_batch_on_this_cp_rank

    from hybrid_megatron.models.context_parallel_attention import context_parallel_positions

    seq, chunk = 4 * cp * 3, 2 * 3  # 2*cp chunks of 6 positions
    seen = []
    for rank in range(cp):
        batch = {"tokens": torch.arange(seq).expand(2, seq).contiguous()}
        local = get_batch_on_this_cp_rank(batch, _Group(cp, rank))["tokens"]
        first, second = rank * chunk, (2 * cp - 1 - rank) * chunk
        expected = list(range(first, first + chunk)) + list(range(second, second + chunk))
        assert local[1].tolist() == expected
        # the attention's global positions follow the same order
        assert context_parallel_positions(local.shape[1], cp, rank).tolist() == expected
        seen += expected
    assert sorted(seen) == list(range(seq))  # every position on exactly one rank


def _layout(raw: dict, tp: int = 1, **parallel) -> None:
    check_parallel_layout(ModelConfig(**raw), ParallelConfig(tp=tp, **parallel), tp, 1)


def test_mamba_heads_mode_caps_cp():
    # tiny mamba: 8 SSM heads (expand 2 x 64 / head_dim 16), 2 groups
    with pytest.raises(
        ModelConfigError,
        match=r"parallel.mamba_cp: heads mode splits the Mamba blocks' 8 SSM heads over tp\*cp = 1\*3",
    ):
        _layout(tiny_model("mamba"), cp=3, mamba_cp="heads")
    with pytest.raises(
        ModelConfigError, match=r"over tp\*cp = 2\*8 ranks; they do not divide \(cp must divide 4"
    ):
        _layout(tiny_model("mamba"), tp=2, cp=8, mamba_cp="heads")
    _layout(tiny_model("mamba"), cp=4, mamba_cp="heads")
    _layout(tiny_model("mamba"), cp=3, mamba_cp="sequence")  # no cap on the sequence-sharded scan


def test_mamba_heads_mode_needs_groups_to_fit_cp():
    raw = tiny_model("mamba", hidden_size=96, mamba={"num_groups": 4})  # 12 heads, 4 groups
    with pytest.raises(
        ModelConfigError, match="parallel.mamba_cp: heads mode needs the Mamba blocks' 4 B/C groups per TP"
    ):
        _layout(raw, cp=6, mamba_cp="heads")


def test_intra_mamba_branch_heads_mode_caps_cp():
    raw = tiny_model("intra", pattern={"ratio": None, "layout": "HHHH"})  # 4 branch heads
    with pytest.raises(
        ModelConfigError,
        match=r"parallel.mamba_cp: heads mode splits the intra block's Mamba branch's 4 SSM heads "
        r"over tp\*cp = 1\*8",
    ):
        _layout(raw, cp=8, mamba_cp="heads")
    _layout(raw, cp=4, mamba_cp="heads")


def test_sliding_window_needs_a_cp_comm_with_windows():
    with pytest.raises(
        ModelConfigError, match="parallel.cp_comm: p2p .* does not take model.attention.sliding_window"
    ):
        _layout(tiny_model("swa"), cp=2, cp_comm="p2p")
    _layout(tiny_model("swa"), cp=2, cp_comm="all_gather")
    _layout(tiny_model("swa"), cp=1, cp_comm="p2p")  # no CP: nothing to check


def test_a2a_splits_heads_over_tp_times_cp():
    # 4 heads, 2 query groups
    with pytest.raises(
        ModelConfigError,
        match=r"parallel.cp_comm: a2a splits model.attention.num_query_groups \(2\) over tp\*cp = 1\*4",
    ):
        _layout(tiny_model("transformer"), cp=4, cp_comm="a2a")
    _layout(tiny_model("transformer"), cp=2, cp_comm="a2a")
    _layout(tiny_model("transformer"), cp=4, cp_comm="all_gather")


def test_sequence_must_split_into_2cp_chunks():
    with pytest.raises(
        ModelConfigError, match=r"data.seq_length: 24 does not split into 2\*cp = 10 equal chunks"
    ):
        check_sequence_split(24, ParallelConfig(cp=5))
    with pytest.raises(
        ModelConfigError,
        match="data.seq_length: each of parallel.cp=4 ranks holds 6 positions, which do not split "
        "over parallel.tp=4",
    ):
        check_sequence_split(24, ParallelConfig(cp=4, tp=4, sequence_parallel=True))
    check_sequence_split(24, ParallelConfig(cp=3, tp=2, sequence_parallel=True))


def test_recipe_validation_checks_the_sequence_split():
    with pytest.raises(RecipeError, match=r"data.seq_length: 128 does not split into 2\*cp = 6"):
        load_recipe(RECIPES / "transformer_tiny.yaml", ["parallel.cp=3"])


def test_derived_counts_cp_ranks():
    recipe = load_recipe(RECIPES / "transformer_tiny.yaml", ["parallel.cp=2"])
    tp = recipe.parallel.tp
    values = derived(recipe, 4 * tp, param_counter=lambda model: None)
    assert (values["cp"], values["dp"]) == (2, 2)
    text = format_derived(values)
    assert f"ranks     {4 * tp} = tp {tp} x cp 2 x pp 1 x dp 2" in text
    assert f"{recipe.data.seq_length} tokens ({recipe.data.seq_length // 2} per rank over cp 2)" in text
    with pytest.raises(
        RecipeError, match=rf"parallel: world size {3 * tp} is not divisible by tp\*cp\*pp = {tp}\*2\*1"
    ):
        derived(recipe, 3 * tp, param_counter=lambda model: None)
