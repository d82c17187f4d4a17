"""Inference efficiency: decode throughput with KV + SSM caching, and measured cache bytes.

Throughput: for each batch size x context length, a prompt of ``context`` held-out tokens per
sequence is prefilled, then ``new_tokens`` tokens are decoded one step at a time through
megatron-core's static inference context; prefill and decode tokens/s are timed separately.

Cache bytes are *measured* on the tensors the context holds after a generation, per sequence:
every attention layer's K and V rows that a next decode step can still attend to (all filled
rows, or the last W for a sliding-window layer), and every Mamba mixer's conv and SSM state
tensors. They are compared with ``hybrid_megatron.accounting.cache_bytes`` at the same length
and element size. megatron-core's static context *allocates* K/V for ``max_sequence_length``
and does not evict rows outside a window; that allocation is reported separately.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from hybrid_megatron.evaluation.common import model_device
from hybrid_megatron.evaluation.generation import decode_step, new_inference_context, prefill


def _cache_owners(model) -> dict:
    """Cache key -> ("attention", window or None) | ("mamba", None) for every mixer in ``model``."""
    from megatron.core.ssm.mamba_mixer import MambaMixer
    from megatron.core.transformer.attention import Attention

    owners = {}
    for module in model.modules():
        if isinstance(module, MambaMixer):
            owners[module.layer_number] = ("mamba", None)
        elif isinstance(module, Attention):
            softmax = getattr(module.core_attention, "scale_mask_softmax", None)
            window = getattr(softmax, "window_size", None)
            # megatron's (left, right) window: a query sees itself and `left` earlier keys.
            owners[module.layer_number] = ("attention", None if window is None else window[0] + 1)
    return owners


def measure_cache_bytes(model, context) -> dict:
    """Per-sequence cache bytes held in ``context`` after a cached forward of ``model``.

    Returns ``{"kv", "conv", "ssm", "total", "kv_allocated", "dtype_bytes", "seq_len",
    "layers": {key: {...}}}``: ``kv`` counts the K/V rows a next step can attend to
    (``min(filled, window)``); ``kv_allocated`` the static buffers' full size. Per sequence =
    the batch-0 slice (every sequence of a static batch holds the same amount).
    """
    owners = _cache_owners(model)
    filled = context.sequence_len_offset
    out: dict[str, Any] = {"kv": 0, "conv": 0, "ssm": 0, "kv_allocated": 0, "layers": {}}
    dtype_bytes = None
    for key, tensors in context.key_value_memory_dict.items():
        kind, window = owners[key]
        first, second = tensors
        size = first.element_size()
        dtype_bytes = dtype_bytes or size
        if kind == "attention":
            kept = filled if window is None else min(filled, window)
            kv = (first[:kept, 0].numel() + second[:kept, 0].numel()) * size
            alloc = (first[:, 0].numel() + second[:, 0].numel()) * size
            out["kv"] += kv
            out["kv_allocated"] += alloc
            out["layers"][str(key) + ("" if type(key) is int else "/mamba")] = {
                "kv": kv,
                "kv_allocated": alloc,
            }
        else:
            conv = first[0].numel() * first.element_size()
            ssm = second[0].numel() * second.element_size()
            out["conv"] += conv
            out["ssm"] += ssm
            out["layers"][str(key) + ("" if type(key) is int else "/mamba")] = {"conv": conv, "ssm": ssm}
    out["total"] = out["kv"] + out["conv"] + out["ssm"]
    out["dtype_bytes"] = dtype_bytes
    out["seq_len"] = filled
    return out


def accounted_cache_bytes(model_cfg, seq_len: int, dtype_bytes: int) -> dict:
    """The accounting module's per-sequence figures, summed over blocks: kv, conv, ssm, total."""
    from hybrid_megatron.accounting import cache_bytes

    report = cache_bytes(model_cfg, seq_len, dtype_bytes)
    sums = {"kv": 0, "conv": 0, "ssm": 0}
    for b in report.blocks.values():
        sums["kv"] += b.kv_bytes * b.count
        sums["conv"] += b.conv_bytes * b.count
        sums["ssm"] += b.ssm_bytes * b.count
    sums["total"] = report.total_bytes
    return sums


@torch.no_grad()
def cache_check(
    model, model_cfg, prompt_len: int, new_tokens: int, vocab: int | None = None, seed: int = 0
) -> dict:
    """Generate ``new_tokens`` after a random prompt, then measure and account the cache.

    Returns ``{"measured": measure_cache_bytes(...), "accounted": accounted_cache_bytes(...),
    "equal": bool}`` at the final length ``prompt_len + new_tokens``.
    """
    vocab = vocab or model_cfg.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g).to(model_device(model))
    ctx = new_inference_context(1, prompt_len + new_tokens)
    logits = prefill(model, prompt, ctx)
    for _ in range(new_tokens):
        logits = decode_step(model, logits.argmax(-1), ctx)
    measured = measure_cache_bytes(model, ctx)
    accounted = accounted_cache_bytes(model_cfg, measured["seq_len"], measured["dtype_bytes"])
    equal = all(measured[k] == accounted[k] for k in ("kv", "conv", "ssm", "total"))
    return {"measured": measured, "accounted": accounted, "equal": equal}


@torch.no_grad()
def throughput(
    model,
    prompt_tokens: torch.Tensor,
    batch_sizes: Sequence[int],
    contexts: Sequence[int],
    new_tokens: int = 16,
    repeats: int = 1,
) -> list[dict]:
    """Prefill and decode tokens/s for every (batch size, context length).

    ``prompt_tokens`` is a 1-D stream of at least ``max(batch) * max(context)`` ids; sequence i
    of a batch takes its i-th slice. Each cell is timed ``repeats`` times (best kept). Returns
    one dict per cell: batch, context, new_tokens, prefill_s, decode_s, prefill_tokens_per_s,
    decode_tokens_per_s, cache_bytes_per_seq (measured at context + new_tokens).
    """
    model.eval()
    device = model_device(model)
    rows = []
    for ctx_len in contexts:
        for batch in batch_sizes:
            need = batch * ctx_len
            if len(prompt_tokens) < need:
                raise ValueError(f"need {need} prompt tokens, got {len(prompt_tokens)}")
            prompt = prompt_tokens[:need].view(batch, ctx_len).to(device)
            best: tuple[float, float, Any] | None = None  # (prefill s, decode s, cache bytes)
            for _ in range(repeats):
                ctx = new_inference_context(batch, ctx_len + new_tokens)
                t0 = time.perf_counter()
                logits = prefill(model, prompt, ctx)
                t1 = time.perf_counter()
                for _ in range(new_tokens):
                    logits = decode_step(model, logits.argmax(-1), ctx)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                if best is None or (t2 - t1) < best[1]:
                    best = (t1 - t0, t2 - t1, measure_cache_bytes(model, ctx)["total"])
            assert best is not None, "repeats must be at least 1"
            rows.append(
                {
                    "batch": batch,
                    "context": ctx_len,
                    "new_tokens": new_tokens,
                    "prefill_s": best[0],
                    "decode_s": best[1],
                    "prefill_tokens_per_s": batch * ctx_len / best[0],
                    "decode_tokens_per_s": batch * new_tokens / best[1],
                    "cache_bytes_per_seq": best[2],
                }
            )
    return rows


def run_inference(
    checkpoint: str,
    batch_sizes: Sequence[int] = (1, 4),
    contexts: Sequence[int] = (128, 512),
    new_tokens: int = 16,
    repeats: int = 1,
) -> dict:
    """Inference task for one checkpoint: throughput table and cache-bytes check at each context."""
    from hybrid_megatron.evaluation.common import checkpoint_label, load_for_eval, token_stream

    recipe, model = load_for_eval(checkpoint)
    stream = torch.from_numpy(token_stream(recipe, max(batch_sizes) * max(contexts)))
    rows = throughput(model, stream, batch_sizes, contexts, new_tokens, repeats)
    caches = {str(c): cache_check(model, recipe.model, c, new_tokens) for c in contexts}
    for c in caches.values():
        c["measured"].pop("layers")
    return {
        "checkpoint": str(checkpoint),
        "label": checkpoint_label(checkpoint),
        "throughput": rows,
        "cache": caches,
        "device": str(model_device(model)),
        "cache_matches_accounting": all(c["equal"] for c in caches.values()),
    }
