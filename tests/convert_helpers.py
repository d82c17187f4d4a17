"""Helpers for the conversion tests: random-weight models, our logits and greedy decoding,
export + reload through transformers."""

from __future__ import annotations

import functools
import math

import torch


def perturb(model, seed: int = 0) -> None:
    """Randomise every parameter (norms, A_log, D, dt_bias, scalars too) and the MoE routers'
    expert-bias buffers, so parity is not trivial.

    Weights are replaced in place with values of their usual scale but no special structure.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            rand = functools.partial(torch.randn, p.shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                p.copy_(torch.empty(p.shape).uniform_(1, 8, generator=g).log())
            elif leaf == "dt_bias":
                p.copy_(rand() * 0.5 - 1.0)
            elif leaf == "D" or name.endswith("_scale"):
                p.copy_(1.0 + 0.3 * rand())
            elif "norm" in name or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * rand())
            elif p.dim() >= 2:
                fan_in = p.shape[1] * (p.shape[2] if p.dim() == 3 else 1)
                p.copy_(rand() / math.sqrt(fan_in))
            else:  # conv bias
                p.copy_(0.1 * rand())
        for name, b in model.named_buffers():
            if name.endswith(("expert_bias", "e_score_correction_bias")):  # changes the routing
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def full_state(model) -> dict:
    """The model's state dict without megatron's non-tensor ``_extra_state`` entries."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def our_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, vocab] of our megatron-core model (TP=1) for tokens [b, s]."""
    b, s = tokens.shape
    with torch.no_grad():
        pos = torch.arange(s).expand(b, s).contiguous()
        return model(tokens, pos, None).float()


def our_greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation with our model, recomputing the whole prefix each step (no cache)."""
    seq = prompt
    for _ in range(new_tokens):
        nxt = our_logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def load_hf(path):
    """Load an export with transformers in fp32 (remote code trusted: it is our own file)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


def hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, vocab] of a transformers model, no cache."""
    with torch.no_grad():
        return hf_model(input_ids=tokens, use_cache=False).logits.float()


def hf_greedy(hf_model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers ``generate`` (greedy, with its KV + SSM cache)."""
    with torch.no_grad():
        return hf_model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=None,
            attention_mask=torch.ones_like(prompt),
        )
