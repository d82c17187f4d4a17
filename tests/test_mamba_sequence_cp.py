"""Sequence-mode Mamba context parallelism in the mixers (CPU, gloo): a MambaSublayer and the intra
block's MambaBranch with the sequence split over CP ranks (megatron-core's 2 x CP chunk order)
give the outputs, input gradients and parameter gradients of the same module on the whole
sequence; at TP=2 x CP=2 too; and ``heads`` mode (megatron-core's) agrees where it applies.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.distributed import run_distributed
from tests.model_configs import tiny_model

BATCH = 2


def _model_cfg(kind: str, heads: int = 8) -> dict:
    """One mixer with ``heads`` Mamba heads of dim 8 in 2 groups (heads mode needs TP x CP | heads)."""
    width = heads * 8
    return tiny_model(
        kind,
        num_layers=1,
        hidden_size=width // 2,
        ffn_hidden_size=width,
        mamba={"state_dim": 8, "head_dim": 8, "num_groups": 2, "chunk_size": 8},
        **(
            {"pattern": {"ratio": "1:0"}, "intra": {"dim_ratio": "0:1", "mixer_width": width}}
            if kind == "intra"
            else {}
        ),
    )


def _mixer_spec(kind: str, cfg, tconfig, mode: str | None):
    """The mixer's ModuleSpec as the model's specs build it, with ``context_parallel_mode`` added
    (None: left out, megatron-core's behaviour)."""
    from hybrid_megatron.models.intra import IntraHybridMixer
    from hybrid_megatron.models.specs import block_spec

    extra = {} if mode is None else {"context_parallel_mode": mode}
    if kind == "mamba":
        spec = block_spec("M", cfg, tconfig, "local").submodules.self_attention
        return dataclasses.replace(spec, params={**spec.params, **extra})
    spec = block_spec("H", cfg, tconfig, "local").submodules.self_attention
    assert spec.module is IntraHybridMixer and spec.params["attention_config"] is None
    mamba = spec.submodules.mamba
    mamba = dataclasses.replace(mamba, params={**mamba.params, **extra})
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mamba=mamba))


def _shard(t, rank: int, cp: int):
    """The CP rank's slices of ``t`` [s, ...]: global chunks rank and 2cp-1-rank of 2cp."""
    import torch

    chunks = torch.chunk(t, 2 * cp, dim=0)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=0)


def _rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def cp_worker(rank: int, world: int, tp: int, kind: str, seq: int, heads: int, modes: list[str]) -> dict:
    """Reference: the mixer on the whole sequence (CP group of one rank, same TP group). Then each
    of ``modes`` with the real CP group on this rank's slices; returns relative errors of outputs,
    input gradients and every parameter's gradient (summed over CP, as the data-parallel reduction
    does), and megatron-core's refusal where heads mode is left out."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from hybrid_megatron.config.model import ModelConfig
    from hybrid_megatron.models.mamba import MambaBranch, MambaSublayer
    from hybrid_megatron.models.transformer_config import build_transformer_config, intra_branch_configs
    from tests.convert_helpers import perturb

    cp = world // tp
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(1)
    torch.manual_seed(1)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    cp_group = parallel_state.get_context_parallel_group()
    cp_rank = parallel_state.get_context_parallel_rank()
    alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
    cfg = ModelConfig(**_model_cfg(kind, heads))
    tconfig = build_transformer_config(cfg)
    config = tconfig if kind == "mamba" else intra_branch_configs(cfg, tconfig)[1]

    def build(mode, group):
        pgs = ProcessGroupCollection(tp=tp_group, cp=group)
        conf = config
        if mode == "sequence_unfused":  # megatron-core's unfused path routes to the same scan
            mode, conf = "sequence", dataclasses.replace(config, use_mamba_mem_eff_path=False)
        module = build_module(_mixer_spec(kind, cfg, tconfig, mode), config=conf, pg_collection=pgs)
        mamba = module if kind == "mamba" else module.mamba
        assert isinstance(mamba, MambaSublayer if kind == "mamba" else MambaBranch)
        return module, mamba

    def run(module, x):
        x = x.detach().requires_grad_(True)
        out, bias = module(x, attention_mask=None)
        assert bias is None
        return out, x

    g = torch.Generator().manual_seed(11)
    x_full = torch.randn(seq, BATCH, cfg.hidden_size, generator=g)
    grad_full = torch.randn(seq, BATCH, cfg.hidden_size, generator=g)

    ref, _ = build(None, alone)
    perturb(ref, seed=5)
    out_ref, x_ref = run(ref, x_full)
    (out_ref * grad_full).sum().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    result: dict = {"cp": cp, "ref_out_max": float(out_ref.abs().max())}
    for mode in modes:
        module, mamba = build(mode, cp_group)
        module.load_state_dict(ref.state_dict())
        out, x = run(module, _shard(x_full, cp_rank, cp))
        (out * _shard(grad_full, cp_rank, cp)).sum().backward()
        errs = {
            "out": _rel_err(out, _shard(out_ref, cp_rank, cp)),
            "input_grad": _rel_err(x.grad, _shard(x_ref.grad, cp_rank, cp)),
        }
        for name, p in module.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad, group=cp_group)
            errs[f"grad:{name}"] = _rel_err(grad, ref_grads[name])
        result[mode] = errs
        result[f"{mode}_local_heads"] = mamba.cp.nheads_local_tpcp
        result[f"{mode}_sequence_sharded"] = mamba.sequence_cp_group is not None
        result["num_params"] = len(errs) - 2
    if "heads" not in modes:
        try:
            build("heads", cp_group)
        except AssertionError as err:
            result["heads_refused"] = str(err)
    return result


def _check(ranks: list[dict], modes: list[str], tp: int, heads: int) -> None:
    for r in ranks:
        assert r["ref_out_max"] > 1e-2, r
        assert r["num_params"] >= 5, r  # conv weight and bias, A_log, dt_bias, D, norm, ...
        for mode in modes:
            for name, err in r[mode].items():
                # the TP tests' tolerance: float32 sums in another order
                assert err < (1e-5 if name == "out" else 1e-4), (mode, name, err, r[mode])
        if "sequence" in modes:
            assert r["sequence_sequence_sharded"] and r["sequence_local_heads"] == heads // tp, r
        if "heads" in modes:
            assert not r["heads_sequence_sharded"] and r["heads_local_heads"] == heads // tp // r["cp"], r
        else:
            assert "divisible" in r["heads_refused"], r


BOTH = ["sequence", "heads"]
CASES = [
    # kind, world, tp, seq, heads, modes: CP = world / tp; slices of seq / (2 CP) tokens, chunk 8
    pytest.param("mamba", 2, 1, 40, 8, [*BOTH, "sequence_unfused"], id="mamba_cp2"),  # slices of 10
    pytest.param("intra", 2, 1, 40, 8, BOTH, id="intra_cp2"),
    # the CP=4 cases run with `make test-long` (4 ranks each: 15-25 s on 2 idle cores)
    pytest.param("intra", 4, 1, 24, 8, BOTH, id="intra_cp4", marks=pytest.mark.long),  # slices of 3 < halo
    pytest.param("mamba", 4, 2, 24, 8, BOTH, id="mamba_tp2_cp2"),
    # 6 heads: CP=4 is beyond heads mode (megatron-core refuses it), sequence mode runs it
    pytest.param("mamba", 4, 1, 24, 6, ["sequence"], id="mamba_cp4_6heads", marks=pytest.mark.long),
]


@pytest.mark.slow  # 15-35 s each on 2 idle cores, minutes when they are shared
@pytest.mark.parametrize("kind,world,tp,seq,heads,modes", CASES)
def test_sequence_mode_matches_whole_sequence_and_heads_mode(kind, world, tp, seq, heads, modes, tmp_path):
    ranks = run_distributed(cp_worker, world, tmp_path, tp, kind, seq, heads, modes)
    _check(ranks, modes, tp, heads)


def test_mode_is_checked_and_heads_is_the_default(single_rank):
    """An unknown mode is refused by name; without CP the sequence mode runs megatron-core's own
    path (nothing to shard) and gives the default's output."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from hybrid_megatron.config.model import ModelConfig
    from hybrid_megatron.models.transformer_config import build_transformer_config

    cfg = ModelConfig(**_model_cfg("mamba"))
    tconfig = build_transformer_config(cfg)
    pgs = ProcessGroupCollection(
        tp=parallel_state.get_tensor_model_parallel_group(), cp=parallel_state.get_context_parallel_group()
    )

    def build(mode):
        spec = _mixer_spec("mamba", cfg, tconfig, mode)
        return build_module(spec, config=tconfig, pg_collection=pgs)

    with pytest.raises(ValueError, match="context_parallel_mode.*'rows'"):
        build("rows")
    default, sequence = build(None), build("sequence")
    assert default.context_parallel_mode == "heads" and sequence.context_parallel_mode == "sequence"
    assert sequence.sequence_cp_group is None and sequence.pg_collection is pgs
    sequence.load_state_dict(default.state_dict())
    x = torch.randn(16, BATCH, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(default(x)[0], sequence(x)[0])
