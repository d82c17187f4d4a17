"""The sequence-sharded conv1d and SSD scan (``ops.ssd_context_parallel``) against the whole
sequence: the float64 token-by-token recurrence and ``F.conv1d``, forward and every input's
gradient.

Ranks are simulated in one process (one thread per rank, the gather a stack of every thread's
tensor, so autograd sees the true cross-rank graph), with real gloo ranks for the collective, and
on GPU with mamba-ssm's kernels against the unsharded kernel.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from hybrid_megatron import ops
from hybrid_megatron.ops.ssd_context_parallel import (
    SequenceShards,
    add_incoming_state,
    causal_conv1d_sequence_sharded,
    conv_halos,
    conv_tails,
    incoming_states,
    segment_log_decay,
    ssd_sequence_sharded,
)
from tests.distributed import run_distributed
from tests.ops_helpers import F64, TOL, make_ssd_inputs, naive_ssd, ref_conv

# ----------------------------------------------------------------------------------------------
# stage functions on segments of any length (zero, shorter than the conv width, one chunk)
# ----------------------------------------------------------------------------------------------

LENGTHS = [
    pytest.param([5, 0, 3, 8], id="with_empty_segment"),
    pytest.param([1, 1, 2, 1, 7], id="tiny_segments"),
    pytest.param([8, 8, 8, 8], id="one_chunk_each"),
    pytest.param([0, 6, 7], id="empty_first"),
]


def _segments(t, lengths):
    return list(torch.split(t, lengths, dim=1))


@pytest.mark.parametrize("lengths", LENGTHS)
def test_stage_functions_rebuild_the_whole_scan(lengths):
    """Zero-start scans of each segment, the prefix over (decay, final state) pairs and the
    read-out of the incoming state give the recurrence over the whole sequence."""
    t = make_ssd_inputs(2, sum(lengths), 4, 3, 2, 5, seed=1)
    dt = F.softplus(t["dt_raw"])
    ref, ref_final = naive_ssd(t["x"], dt, t["A"], t["B"], t["C"], D=t["D1"])
    parts = [_segments(v, lengths) for v in (t["x"], dt, t["B"], t["C"])]
    ys, finals, totals, log_decays = [], [], [], []
    for x, d, B, C in zip(*parts, strict=True):
        y, final = ops.mamba_chunk_scan_combined(x, d, t["A"], B, C, 8, D=t["D1"], return_final_states=True)
        log_decay = segment_log_decay(d, t["A"])
        ys.append(y)
        finals.append(final)
        log_decays.append(log_decay)
        totals.append((d * t["A"]).sum(1))
    states = incoming_states(torch.stack(totals), torch.stack(finals))
    out = [
        add_incoming_state(y, C, ld, s) for y, C, ld, s in zip(ys, parts[3], log_decays, states, strict=True)
    ]
    assert (torch.cat(out, dim=1) - ref).abs().max().item() < TOL
    # the state after the last segment is the whole sequence's final state
    last = torch.exp(totals[-1])[..., None, None] * states[-1] + finals[-1]
    assert (last - ref_final).abs().max().item() < TOL
    # without the incoming states the later segments are wrong: the correction is doing work
    assert (torch.cat(ys, dim=1) - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("width", [4, 2])
def test_conv_halos_carry_the_previous_inputs(lengths, width):
    """Each segment's conv over (halo, segment) equals the whole sequence's conv at its positions,
    also where a segment is shorter than the halo (the halo then reaches further back)."""
    gen = torch.Generator().manual_seed(2)
    b, d = 2, 3
    x = torch.randn(b, sum(lengths), d, generator=gen, dtype=F64)
    w = torch.randn(d, width, generator=gen, dtype=F64)
    bias = torch.randn(d, generator=gen, dtype=F64)
    ref = ref_conv(x.transpose(1, 2), w, bias, "silu").transpose(1, 2)
    segs = _segments(x, lengths)
    halos = conv_halos(torch.stack([conv_tails(s, width) for s in segs]), lengths)
    assert halos.shape == (len(lengths), b, width - 1, d)
    assert halos[0].abs().max() == 0  # nothing precedes the sequence
    out = []
    for s, halo in zip(segs, halos, strict=True):
        window = torch.cat([halo, s], dim=1).transpose(1, 2)
        out.append(ops.causal_conv1d_fn(window, w, bias, activation="silu")[..., width - 1 :].transpose(1, 2))
    assert (torch.cat(out, dim=1) - ref).abs().max().item() < TOL


# ----------------------------------------------------------------------------------------------
# the composed functions, ranks simulated by threads (exact autograd across "ranks")
# ----------------------------------------------------------------------------------------------


class ThreadRanks:
    """``world`` threads in lockstep; ``gather`` stacks every thread's tensor like all_gather.

    One thread computes at a time (a lock released only at the gathers), so kernels that compile
    on first use never do so concurrently.
    """

    def __init__(self, world: int):
        self.world = world
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world)
        self.turn = threading.Lock()

    def _wait(self):
        self.turn.release()
        try:
            self.barrier.wait()
        finally:
            self.turn.acquire()

    def gather_for(self, rank: int):
        def gather(t):
            self.slots[rank] = t
            self._wait()
            out = torch.stack(list(self.slots))
            self._wait()  # nobody overwrites a slot before everyone has read it
            return out

        return gather

    def run(self, fn):
        """``fn(rank, gather)`` on every rank at once; returns the results in rank order."""
        results: list = [None] * self.world
        errors: list = []

        def body(rank):
            self.turn.acquire()
            try:
                results[rank] = fn(rank, self.gather_for(rank))
            except BaseException as err:  # re-raised in the caller
                errors.append(err)
                self.barrier.abort()
            finally:
                self.turn.release()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return results


def shard(t, rank, world):
    """The rank's slice of ``t`` (b, l, ...) in megatron-core's 2 x CP chunk order."""
    chunks = torch.chunk(t, 2 * world, dim=1)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=1)


def unshard(parts, world):
    """The whole sequence from every rank's slices (inverse of ``shard``)."""
    chunks = [None] * (2 * world)
    for rank, p in enumerate(parts):
        first, second = torch.chunk(p, 2, dim=1)
        chunks[rank], chunks[2 * world - 1 - rank] = first, second
    return torch.cat(chunks, dim=1)


def _leaves(t: dict, names) -> dict:
    return {k: t[k].clone().requires_grad_(True) for k in names}


def _sharded_mixer_math(rank, gather, world, v, width, chunk):
    """conv (with halos) then scan, as the mixer chains them, on this rank's slices."""
    shards = SequenceShards.load_balanced(rank, world)
    xBC = causal_conv1d_sequence_sharded(
        shard(v["xBC"], rank, world), v["w"], v["bias"], "silu", shards, gather
    )
    h, p, g, n = v["D"].shape[0], v["D"].shape[1], v["B_groups"], v["n"]
    x, B, C = torch.split(xBC, [h * p, g * n, g * n], dim=-1)
    b, l = x.shape[:2]
    dt = F.softplus(shard(v["dt"], rank, world) + v["dt_bias"])
    return ssd_sequence_sharded(
        x.reshape(b, l, h, p),
        dt,
        v["A"],
        B.reshape(b, l, g, n),
        C.reshape(b, l, g, n),
        chunk,
        v["D"],
        shards,
        gather,
    )


def _whole_mixer_math(v, width):
    h, p, g, n = v["D"].shape[0], v["D"].shape[1], v["B_groups"], v["n"]
    xBC = ref_conv(v["xBC"].transpose(1, 2), v["w"], v["bias"], "silu").transpose(1, 2)
    x, B, C = torch.split(xBC, [h * p, g * n, g * n], dim=-1)
    b, l = x.shape[:2]
    dt = F.softplus(v["dt"] + v["dt_bias"])
    y, _ = naive_ssd(
        x.reshape(b, l, h, p), dt, v["A"], B.reshape(b, l, g, n), C.reshape(b, l, g, n), D=v["D"]
    )
    return y


def _mixer_inputs(b, seq, h, p, g, n, width, seed=3):
    t = make_ssd_inputs(b, seq, h, p, g, n, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    dim = h * p + 2 * g * n
    raw = {
        "xBC": torch.randn(b, seq, dim, generator=gen, dtype=F64),
        "w": torch.randn(dim, width, generator=gen, dtype=F64) * 0.5,
        "bias": torch.randn(dim, generator=gen, dtype=F64) * 0.1,
        "dt": t["dt_raw"],
        "dt_bias": t["dt_bias"],
        "A": t["A"],
        "D": t["D"],
    }
    v = _leaves(raw, raw.keys())
    v.update(B_groups=g, n=n)
    return v


CASES = [
    # world, seq, chunk, conv width: the SSD chunk vs. the per-rank slices
    pytest.param(2, 32, 4, 4, id="cp2_many_chunks_per_slice"),
    pytest.param(2, 16, 4, 4, id="cp2_one_chunk_per_slice"),
    pytest.param(4, 8, 4, 4, id="cp4_slices_of_one_token"),  # shorter than the conv halo
    pytest.param(4, 24, 16, 3, id="cp4_slices_shorter_than_a_chunk"),
]


@pytest.mark.parametrize("world,seq,chunk,width", CASES)
def test_sequence_sharded_conv_and_scan_match_whole_sequence(world, seq, chunk, width):
    """Forward and the gradient of every input (conv weight and bias, xBC, dt, dt_bias, A, D)."""
    v = _mixer_inputs(2, seq, 4, 3, 2, 5, width)
    grad_out = torch.randn(2, seq, 4, 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    ref = _whole_mixer_math(v, width)
    (ref * grad_out).sum().backward()
    names = ["xBC", "w", "bias", "dt", "dt_bias", "A", "D"]
    ref_grads = {k: v[k].grad.clone() for k in names}
    for k in names:
        v[k].grad = None

    outs = ThreadRanks(world).run(lambda r, gather: _sharded_mixer_math(r, gather, world, v, width, chunk))
    out = unshard(outs, world)
    assert (out - ref).abs().max().item() < TOL
    (out * grad_out).sum().backward()
    for k in names:
        err = (v[k].grad - ref_grads[k]).abs().max().item()
        assert err < TOL * max(1.0, ref_grads[k].abs().max().item()), (k, err)
        assert ref_grads[k].abs().max() > 0, k


def test_conv_halo_crosses_slice_boundaries():
    """A sharded conv that dropped the halos would differ exactly at the first d_conv-1 positions
    of every slice but the first: the halo is what makes those right."""
    world, width = 2, 4
    v = _mixer_inputs(1, 16, 2, 2, 1, 2, width)
    ref = ref_conv(v["xBC"].transpose(1, 2), v["w"], v["bias"], "silu").transpose(1, 2)

    def no_halo(t):
        return torch.zeros_like(t).unsqueeze(0).expand(world, *t.shape)

    def run(rank, gather):
        shards = SequenceShards.load_balanced(rank, world)
        return causal_conv1d_sequence_sharded(
            shard(v["xBC"], rank, world), v["w"], v["bias"], "silu", shards, gather
        )

    good = unshard(ThreadRanks(world).run(run), world)
    assert (good - ref).abs().max().item() < TOL
    bad = unshard([run(r, no_halo) for r in range(world)], world)
    wrong = ((bad - ref).abs().amax(dim=(0, 2)) > 1e-6).nonzero().flatten().tolist()
    expected = [p for start in (4, 8, 12) for p in range(start, start + width - 1)]
    assert wrong == expected


# ----------------------------------------------------------------------------------------------
# the collective itself: gloo ranks
# ----------------------------------------------------------------------------------------------


def _gloo_worker(rank, world):
    import torch.distributed as dist

    from hybrid_megatron.ops.ssd_context_parallel import all_gather_autograd

    def gather(t):
        return all_gather_autograd(t, dist.group.WORLD)

    v = _mixer_inputs(2, 8 * world, 4, 3, 2, 5, 4)
    grad_out = torch.randn(2, 8 * world, 4, 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    ref = _whole_mixer_math(v, 4)
    (ref * grad_out).sum().backward()
    names = ["xBC", "w", "bias", "dt", "dt_bias", "A", "D"]
    ref_grads = {k: v[k].grad.clone() for k in names}
    for k in names:
        v[k].grad = None
    out = _sharded_mixer_math(rank, gather, world, v, 4, 4)
    (out * shard(grad_out, rank, world)).sum().backward()
    # Each rank's backward leaves the gradient of its own use of the inputs: summed over ranks
    # it must be the whole sequence's gradient.
    errs = {}
    for k in names:
        g = v[k].grad.clone()
        dist.all_reduce(g)
        errs[k] = (g - ref_grads[k]).abs().max().item() / ref_grads[k].abs().max().item()
    errs["out"] = (out - shard(ref, rank, world)).abs().max().item()
    return errs


@pytest.mark.slow  # 10-20 s per world size (process start), a minute on busy cores
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.long)])
def test_all_gather_autograd_on_gloo_ranks(world, tmp_path):
    for r in run_distributed(_gloo_worker, world, tmp_path):
        assert max(r.values()) < TOL, r


# ----------------------------------------------------------------------------------------------
# GPU: mamba-ssm's kernels
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("world,seq", [(2, 1000), (4, 2048)])  # slices of 250 and 256 tokens
def test_state_passing_with_mamba_ssm_kernels_matches_unsharded_kernel(world, seq):
    """mamba-ssm's chunked scan and causal-conv1d per simulated rank, with the state passing and
    halos in between, equal the same kernels on the whole sequence, forward and backward.

    The kernels' fp32 matmuls run in TF32 and sum in another order per slice, hence the
    tolerances; a missing halo or state is an O(1) error.
    """
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    torch.manual_seed(0)
    b, h, p, g, n, width, chunk = 2, 8, 64, 2, 64, 4, 128
    dim = h * p + 2 * g * n
    dev = torch.device("cuda")
    leaves = {
        "xBC": torch.randn(b, seq, dim, device=dev),
        "w": torch.randn(dim, width, device=dev) * 0.5,
        "bias": torch.randn(dim, device=dev) * 0.1,
        "dt": torch.randn(b, seq, h, device=dev) - 1.0,
        "dt_bias": torch.randn(h, device=dev) * 0.5,
        "A": -(torch.rand(h, device=dev) + 0.3),
        "D": torch.randn(h, device=dev),
    }
    leaves = {k: t.requires_grad_(True) for k, t in leaves.items()}
    grad_out = torch.randn(b, seq, h, p, device=dev)

    def split_xbc(xBC):
        x, B, C = torch.split(xBC, [h * p, g * n, g * n], dim=-1)
        return x.unflatten(-1, (h, p)), B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n))

    xBC = causal_conv1d_fn(leaves["xBC"].transpose(1, 2), leaves["w"], leaves["bias"], activation="silu")
    x, B, C = split_xbc(xBC.transpose(1, 2))
    ref = mamba_chunk_scan_combined(
        x, leaves["dt"], leaves["A"], B, C, chunk, D=leaves["D"], dt_bias=leaves["dt_bias"], dt_softplus=True
    )
    (ref * grad_out).sum().backward()
    ref_grads = {k: t.grad.clone() for k, t in leaves.items()}
    for t in leaves.values():
        t.grad = None

    def run(rank, gather):
        shards = SequenceShards.load_balanced(rank, world)
        local = causal_conv1d_sequence_sharded(
            shard(leaves["xBC"], rank, world),
            leaves["w"],
            leaves["bias"],
            "silu",
            shards,
            gather,
            conv=causal_conv1d_fn,
        )
        x, B, C = split_xbc(local)
        dt = F.softplus(shard(leaves["dt"], rank, world) + leaves["dt_bias"])
        return ssd_sequence_sharded(
            x, dt, leaves["A"], B, C, chunk, leaves["D"], shards, gather, scan=mamba_chunk_scan_combined
        )

    out = unshard(ThreadRanks(world).run(run), world)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-3
    (out * grad_out).sum().backward()
    for k, t in leaves.items():
        err = ((t.grad - ref_grads[k]).abs().max() / ref_grads[k].abs().max()).item()
        assert err < 2e-2, (k, err)
