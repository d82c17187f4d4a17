"""Greedy / sampled generation with and without KV + SSM state caching.

Uncached generation re-runs the whole sequence for every new token. Cached generation uses
megatron-core's ``StaticInferenceContext``: one prefill pass over the prompt fills the
attention layers' KV cache and the Mamba mixers' conv + SSM states (keyed by layer number),
then every decode step feeds one token per sequence. Both paths give the same tokens (the test
checks it for every model kind); the cached one costs O(1) per token for Mamba layers and
O(context) for attention layers instead of O(context^2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hybrid_megatron.evaluation.common import logits_of, positions


@dataclass
class GenerationResult:
    """Generated ids ``tokens`` [b, prompt + new] and, when cached, the inference context used."""

    tokens: torch.Tensor
    context: object | None = None


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator) -> torch.Tensor:
    """Next token [b] from last-position logits [b, vocab]: argmax, or sampled."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def new_inference_context(batch: int, max_len: int):
    """A static inference context for ``batch`` sequences of up to ``max_len`` tokens.

    megatron-core 0.16.1's StaticInferenceContext, plus the ``seqlen_offset`` attribute that
    MambaMixer's static-batching path reads (``mamba_mixer.py``: ``inference_context.
    seqlen_offset``) but that only the context's ``sequence_len_offset`` provides: without the
    alias any model with a Mamba layer fails on its first cached forward (not CPU-specific).
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    class HybridStaticInferenceContext(StaticInferenceContext):
        """StaticInferenceContext with ``seqlen_offset`` = ``sequence_len_offset``."""

        @property
        def seqlen_offset(self) -> int:
            """Tokens already in the cache (MambaMixer's name for ``sequence_len_offset``)."""
            return self.sequence_len_offset

    return HybridStaticInferenceContext(batch, max_len)


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, context) -> torch.Tensor:
    """Run the prompt [b, s] through ``model`` filling ``context``; returns last logits [b, vocab]."""
    context.reset()
    out = model(
        prompt,
        positions(prompt.shape[0], 0, prompt.shape[1], prompt.device),
        None,
        inference_context=context,
        runtime_gather_output=True,
    )
    context.increment_sequence_len_offset(prompt.shape[1])
    context.enable_decode_mode()
    return out[:, -1].float()


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, context) -> torch.Tensor:
    """Feed one token per sequence (``tokens`` [b]) at the context's offset; returns logits [b, vocab]."""
    start = context.sequence_len_offset
    out = model(
        tokens.unsqueeze(1),
        positions(tokens.shape[0], start, 1, tokens.device),
        None,
        inference_context=context,
        runtime_gather_output=True,
    )
    context.increment_sequence_len_offset(1)
    return out[:, -1].float()


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    use_cache: bool = True,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop_token: int | None = None,
    stop: Callable[[torch.Tensor], bool] | None = None,
) -> GenerationResult:
    """Generate ``max_new_tokens`` tokens after ``prompt`` [b, s] (int64 ids).

    ``temperature`` 0 is greedy; otherwise softmax sampling (optionally top-k) from a generator
    seeded with ``seed``, so the cached and uncached paths draw the same random numbers.
    ``stop_token`` ends generation early once every sequence has produced it; ``stop``, called
    after every step with the ids generated so far ([b, new], on CPU), ends it when it returns
    True (the lm-eval adapter's stop strings). ``use_cache`` False re-runs the full sequence
    per token. Logits are gathered over tensor-parallel ranks on both paths, so every TP rank
    picks the same token. Returns a GenerationResult (ids [b, s + new]).
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool)
    context = None
    try:
        if use_cache:
            context = new_inference_context(prompt.shape[0], prompt.shape[1] + max_new_tokens)
            logits = prefill(model, prompt, context)
        else:
            logits = logits_of(model, tokens)[:, -1]
        for step in range(max_new_tokens):
            nxt = _pick(logits.cpu(), temperature, top_k, gen).to(prompt.device)
            tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)
            if stop_token is not None:
                done |= nxt.cpu() == stop_token
                if bool(done.all()):
                    break
            if stop is not None and stop(tokens[:, prompt.shape[1] :].cpu()):
                break
            if step == max_new_tokens - 1:
                break
            if use_cache:
                logits = decode_step(model, nxt, context)
            else:
                logits = logits_of(model, tokens)[:, -1]
    finally:
        model.train(was_training)
    return GenerationResult(tokens, context)


def run_generate(
    checkpoint: str,
    prompt: str,
    max_new_tokens: int = 64,
    use_cache: bool = True,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> dict:
    """Generate text from a checkpoint; returns ``{"prompt", "completion", "tokens"}``."""
    from hybrid_megatron.data.tokenizer import load_tokenizer
    from hybrid_megatron.evaluation.common import load_for_eval, model_device

    recipe, model = load_for_eval(checkpoint)
    tok = load_tokenizer(recipe.data.tokenizer)
    ids = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=model_device(model))
    out = generate(model, ids, max_new_tokens, use_cache, temperature, top_k, seed, stop_token=tok.eod)
    new = out.tokens[0, ids.shape[1] :].tolist()
    return {"checkpoint": str(checkpoint), "prompt": prompt, "completion": tok.decode(new), "tokens": new}
