"""Each CPU shim of hybrid_megatron.compat does what its docstring says (CPU only).

The shims were applied by ``runtime.setup()`` in tests/conftest.py, as every entry point does.
"""

from __future__ import annotations

import pytest
import torch

from hybrid_megatron import compat

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims apply only without CUDA")


@cpu_only
def test_shims_applied_without_cuda():
    assert compat.cpu_shims_applied()
    assert not compat.mamba_kernels_are_native()  # no mamba-ssm on a CPU machine


@cpu_only
def test_cuda_device_requests_land_on_cpu():
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.empty(2, 2, device=torch.device("cuda", 0)).device.type == "cpu"
    t = torch.ones(4)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert t.to("cuda", torch.float64).dtype == torch.float64
    torch.cuda.synchronize()  # a no-op, not an error
    assert torch.zeros(2).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(2).type(torch.float64).dtype == torch.float64  # the cast form is untouched


@cpu_only
def test_pinned_memory_requests_get_ordinary_memory():
    # megatron-core's context-parallel RoPE slice stages its chunk indices in pinned memory.
    t = torch.tensor([1, 2], device="cpu", pin_memory=True).cuda(non_blocking=True)
    assert t.tolist() == [1, 2] and not t.is_pinned()
    assert torch.empty(3, pin_memory=True).shape == (3,)


@cpu_only
def test_global_memory_buffer_allocates_on_cpu():
    from megatron.core.utils import GlobalMemoryBuffer

    buf = GlobalMemoryBuffer().get_tensor((4, 5), torch.float32, "test")
    assert buf.shape == (4, 5) and buf.device.type == "cpu"


@cpu_only
def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from hybrid_megatron.compat.cpu import CpuRNGStatesTracker

    tracker = get_cuda_rng_tracker()
    assert isinstance(tracker, CpuRNGStatesTracker)
    tracker.reset()
    tracker.add("stream-a", 123)
    torch.manual_seed(0)
    outer_first = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("stream-a"):
        forked = torch.rand(3)
    outer_after = torch.rand(3)
    # the fork used its own stream and left the outer stream where it was
    torch.testing.assert_close(outer_after, outer_first)
    torch.testing.assert_close(forked, torch.rand(3, generator=torch.Generator().manual_seed(123)))
    with tracker.fork("stream-a"):  # continues the stream, not a restart
        assert not torch.equal(torch.rand(3), forked)
    with pytest.raises(Exception, match="seed 123 already exists"):
        tracker.add("stream-b", 123)


@cpu_only
def test_router_gating_linear_matches_linear():
    from megatron.core.transformer.moe import moe_utils

    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)
    torch.testing.assert_close(out, x @ w.T)
    out.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(4, 8).detach())


@cpu_only
def test_causal_masks_on_cpu():
    from megatron.core.transformer import utils

    mask = utils.get_default_causal_mask(3)
    assert mask.device.type == "cpu"
    assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    window = utils.get_sliding_window_causal_mask(4, 4, (1, 0))
    # each query sees itself and one key back
    assert (~window).sum(dim=1).tolist() == [1, 2, 2, 2]
    assert window[3].tolist() == [True, True, False, False]


def test_mamba_mixer_uses_torch_ssd_without_kernels():
    from megatron.core.ssm import mamba_mixer

    from hybrid_megatron import ops

    if compat.mamba_kernels_are_native():
        pytest.skip("mamba-ssm kernels are installed: the native path is used")
    assert mamba_mixer.HAVE_MAMBA_SSM
    assert mamba_mixer.mamba_chunk_scan_combined is ops.mamba_chunk_scan_combined
    assert mamba_mixer.mamba_split_conv1d_scan_combined is ops.mamba_split_conv1d_scan_combined
    assert mamba_mixer.causal_conv1d_fn is ops.causal_conv1d_fn
    assert issubclass(mamba_mixer.ExtendedRMSNorm, ops.RMSNormGated)
