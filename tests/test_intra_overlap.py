"""intra.overlap_branches: the hybrid block's Mamba branch on a side CUDA stream, concurrent with
attention. The flag changes scheduling only, never the math: on CPU it is a no-op (bitwise-equal
loss and gradients), on GPU the overlapped forward and backward match the sequential ones."""

from __future__ import annotations

import pytest
import torch

from hybrid_megatron.models.intra import IntraHybridMixer
from tests.conftest import build_single
from tests.model_configs import tiny_model


def _mixers(model) -> list[IntraHybridMixer]:
    mixers = [m for m in model.modules() if isinstance(m, IntraHybridMixer)]
    assert mixers, "the model has no intra hybrid block"
    return mixers


def _trainable(model) -> int:
    return sum(p.requires_grad for p in model.parameters())


def _loss_and_grads(model, ids, labels, pos):
    """Per-token loss [b, s] (float) and {name: grad (float)} of one forward + backward."""
    model.zero_grad(set_to_none=True)
    loss = model(ids, pos, None, labels=labels).float()
    loss.mean().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_flag_is_a_no_op_on_cpu(single_rank):
    """Built from the same seed with the flag on and off: bitwise-equal loss and gradients."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (2, 13), generator=gen)
    ids, labels, pos = ids[:, :-1], ids[:, 1:], torch.arange(12).expand(2, 12)
    results = {}
    for overlap in (False, True):
        model = build_single(tiny_model("intra", intra={"overlap_branches": overlap}), seed=3)
        assert all(m.overlap_branches is overlap for m in _mixers(model))  # the recipe reaches it
        results[overlap] = _loss_and_grads(model, ids, labels, pos)
        assert all(m._side_stream is None for m in _mixers(model))  # no stream on CPU
    (ref_loss, ref_grads), (loss, grads) = results[False], results[True]
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == _trainable(model)
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name


@pytest.mark.gpu
def test_overlapped_branches_match_sequential_on_gpu(single_rank):
    """One TE bf16 intra model; per step, forward + backward with the flag off then on (the same
    weights and batch): per-token losses and every gradient agree. Three steps with different
    batches, so a missing fork/join or a freed-too-early buffer would show up as a mismatch."""
    from tests.test_gpu import _build, gpu_model

    model = _build(gpu_model("intra", params_dtype="bf16"), seed=7, bf16=True)
    mixers = _mixers(model)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 512, (2, 129), generator=gen).cuda()
        ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        pos = torch.arange(128, device="cuda").expand(2, 128)
        results = {}
        for overlap in (False, True):
            for mixer in mixers:
                mixer.overlap_branches = overlap
            results[overlap] = _loss_and_grads(model, ids, labels, pos)
        assert all(m._side_stream is not None for m in mixers)  # the overlapped path ran
        (ref_loss, ref_grads), (loss, grads) = results[False], results[True]
        assert torch.isfinite(ref_loss).all() and 4.0 < ref_loss.mean().item() < 9.0
        torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2, msg=f"step {step}: loss")
        assert grads.keys() == ref_grads.keys()
        assert len(grads) == _trainable(model), "a parameter got no gradient"
        for name, grad in grads.items():
            ref = ref_grads[name]
            # The same kernels on the same data, so mostly bitwise; the tolerance only absorbs
            # atomics-order noise in the attention / SSD backward kernels (bf16 grads). A stream
            # race reads stale or foreign data and is far outside it.
            scale = ref.abs().max().item()
            torch.testing.assert_close(
                grad, ref, rtol=2e-2, atol=2e-2 * scale + 1e-6, msg=f"step {step}: {name}"
            )
