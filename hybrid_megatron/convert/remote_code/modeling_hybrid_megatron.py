"""Pure-PyTorch modeling file of the ``hybrid_megatron`` remote-code export (copied verbatim).

Loadable with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. Module and
parameter names mirror the megatron-core training model (``decoder.layers.{i}.self_attention...``)
so the export is a plain copy of the trained weights; the math mirrors megatron-core's local
layers (RMSNorm, rotate-half RoPE, GQA with the interleaved [q..., k, v] per-group QKV layout,
SwiGLU, softmax top-k MoE) and its Mamba2 mixer (conv1d over x,B,C, SSD scan, gated RMSNorm of
y * silu(z) per group). Generation keeps a KV cache per attention layer and a conv + SSM state
per Mamba layer (``HybridMegatronCache``). Padding masks are not supported (unpadded batches).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .configuration_hybrid_megatron import HybridMegatronConfig
except ImportError:  # imported as a plain module (tests, conversion code)
    from configuration_hybrid_megatron import HybridMegatronConfig


class HybridMegatronCache:
    """Per-layer inference state: K/V for attention, (conv window, SSM state) for Mamba.

    ``seen`` counts the tokens already processed; attention layers append to their K/V, Mamba
    layers replace their states.
    """

    def __init__(self, num_layers: int):
        self.seen = 0
        self.kv = [None] * num_layers
        self.conv = [None] * num_layers
        self.ssm = [None] * num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already in the cache."""
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder every state along the batch for beam search."""
        for store in (self.conv, self.ssm):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, beam_idx.to(t.device))
        for i, kv in enumerate(self.kv):
            if kv is not None:
                self.kv[i] = tuple(t.index_select(0, beam_idx.to(t.device)) for t in kv)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned weight (torch.nn.RMSNorm math)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class BranchRMSNorm(RMSNorm):
    """The intra block's per-branch output norm (computed in fp32, then scaled)."""

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def _rope(x, positions, base):
    """Rotate-half RoPE of x [b, s, heads, d] at integer positions [s]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]
    cos, sin = emb.cos(), emb.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def attention_core(qkv, heads, groups, head_dim, config, cache, layer_idx):
    """Causal GQA attention on megatron's grouped QKV rows; returns [b, s, heads * head_dim].

    ``qkv`` is [b, s, groups * (heads/groups + 2) * head_dim]: per group its query heads, then
    its key and its value head.
    """
    b, s, _ = qkv.shape
    per = heads // groups
    qkv = qkv.view(b, s, groups, per + 2, head_dim)
    q = qkv[:, :, :, :per].reshape(b, s, heads, head_dim)
    k = qkv[:, :, :, per]
    v = qkv[:, :, :, per + 1]
    start = cache.seen if cache is not None else 0
    positions = torch.arange(start, start + s, device=qkv.device)
    q = _rope(q, positions, config.rotary_base)
    k = _rope(k, positions, config.rotary_base)
    if cache is not None:
        if cache.kv[layer_idx] is not None:
            k = torch.cat([cache.kv[layer_idx][0], k], dim=1)
            v = torch.cat([cache.kv[layer_idx][1], v], dim=1)
        cache.kv[layer_idx] = (k, v)
    k = k.repeat_interleave(per, dim=2)
    v = v.repeat_interleave(per, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # b, h, len, d
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(head_dim)
    key_pos = torch.arange(k.shape[2], device=qkv.device)
    allowed = key_pos[None, :] <= positions[:, None]
    if config.sliding_window:
        # a window of W tokens: the query itself and the W-1 before it (megatron's (W-1, 0)).
        allowed = allowed & (positions[:, None] - key_pos[None, :] < config.sliding_window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v).transpose(1, 2)
    return out.reshape(b, s, heads * head_dim)


def ssd_scan(x, dt, A, B, C, chunk, state):
    """Chunked Mamba2 SSD scan in fp32.

    x [b, s, h, p], dt [b, s, h] (after softplus), A [h], B/C [b, s, h, n] (per head),
    state [b, h, p, n] or None. Returns (y [b, s, h, p], final state).
    """
    b, s, h, p = x.shape
    n = B.shape[-1]
    if state is None:
        state = x.new_zeros(b, h, p, n, dtype=torch.float32)
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    ys = []
    for start in range(0, s, chunk):
        sl = slice(start, start + chunk)
        xc, dtc, Bc, Cc = x[:, sl], dt[:, sl], B[:, sl], C[:, sl]
        cs = torch.cumsum(dtc * A.float(), dim=1)  # b, L, h
        L = xc.shape[1]
        diff = cs[:, :, None, :] - cs[:, None, :, :]  # b, t, s, h
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(diff.masked_fill(~causal[None, :, :, None], float("-inf")))
        cb = torch.einsum("bthn,bshn->btsh", Cc, Bc)
        weights = cb * decay * dtc[:, None, :, :]
        y = torch.einsum("btsh,bshp->bthp", weights, xc)
        y = y + torch.einsum("bthn,bhpn->bthp", Cc, state) * torch.exp(cs)[..., None]
        last = cs[:, -1:, :]  # b, 1, h
        carry = torch.exp(last - cs) * dtc  # b, L, h
        state = state * torch.exp(last[:, 0])[:, :, None, None] + torch.einsum(
            "bsh,bshp,bshn->bhpn", carry, xc, Bc
        )
        ys.append(y)
    return torch.cat(ys, dim=1), state


class MambaCore(nn.Module):
    """Mamba2 after the in-projection: conv1d, SSD scan, D skip, gated RMSNorm (no out_proj)."""

    def __init__(self, config, d_inner):
        super().__init__()
        self.d_inner = d_inner
        self.head_dim = config.mamba_head_dim
        self.nheads = d_inner // self.head_dim
        self.ngroups = config.mamba_num_groups
        self.d_state = config.mamba_state_dim
        self.chunk = config.mamba_chunk_size
        self.kernel = config.mamba_conv_kernel
        self.eps = config.mamba_norm_epsilon
        conv_dim = d_inner + 2 * self.ngroups * self.d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, self.kernel, groups=conv_dim, bias=True)
        self.A_log = nn.Parameter(torch.zeros(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads))
        self.norm = RMSNorm(d_inner, self.eps)

    @property
    def in_width(self):
        """Rows of the in-projection this core consumes: z, x, B, C, dt."""
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    def forward(self, zxbcdt, cache, layer_idx):
        b, s, _ = zxbcdt.shape
        gn = self.ngroups * self.d_state
        z, xbc, dt = torch.split(zxbcdt, [self.d_inner, self.d_inner + 2 * gn, self.nheads], -1)
        xbc = xbc.transpose(1, 2)  # b, c, s
        prev = cache.conv[layer_idx] if cache is not None else None
        if prev is None:
            prev = xbc.new_zeros(b, xbc.shape[1], self.kernel - 1)
        padded = torch.cat([prev, xbc], dim=-1)
        if cache is not None:
            cache.conv[layer_idx] = padded[..., -(self.kernel - 1) :]
        xbc = F.silu(F.conv1d(padded, self.conv1d.weight, self.conv1d.bias, groups=padded.shape[1]))
        xbc = xbc.transpose(1, 2)
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        rep = self.nheads // self.ngroups
        B = B.reshape(b, s, self.ngroups, self.d_state).repeat_interleave(rep, dim=2)
        C = C.reshape(b, s, self.ngroups, self.d_state).repeat_interleave(rep, dim=2)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        x = x.reshape(b, s, self.nheads, self.head_dim)
        state = cache.ssm[layer_idx] if cache is not None else None
        y, state = ssd_scan(x, dt, A, B, C, self.chunk, state)
        if cache is not None:
            cache.ssm[layer_idx] = state
        y = y + x.float() * self.D.float()[:, None]
        y = y.reshape(b, s, self.d_inner)
        # gated RMSNorm: norm(y * silu(z)) per group of d_inner / ngroups channels
        y = y * F.silu(z.float())
        yg = y.view(b, s, self.ngroups, -1)
        yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + self.eps)
        return (yg.view(b, s, self.d_inner) * self.norm.weight.float()).to(zxbcdt.dtype)


class MambaMixer(MambaCore):
    """A Mamba block's mixer: in_proj, MambaCore, out_proj."""

    def __init__(self, config):
        super().__init__(config, config.mamba_d_inner)
        self.in_proj = nn.Linear(config.hidden_size, self.in_width, bias=False)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)

    def forward(self, x, cache, layer_idx):
        return self.out_proj(super().forward(self.in_proj(x), cache, layer_idx))


class Attention(nn.Module):
    """An attention block's mixer: fused QKV, RoPE GQA attention, output projection."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.heads, self.groups, self.head_dim = (
            config.num_attention_heads,
            config.num_query_groups,
            config.head_dim,
        )
        qkv = (self.heads + 2 * self.groups) * self.head_dim
        self.linear_qkv = nn.Linear(config.hidden_size, qkv, bias=False)
        self.linear_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cache, layer_idx):
        out = attention_core(
            self.linear_qkv(x), self.heads, self.groups, self.head_dim, self.config, cache, layer_idx
        )
        return self.linear_proj(out)


class IntraHybridMixer(nn.Module):
    """Attention and Mamba2 branches on one fused in-projection, fused into one out_proj."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.aw, self.mw = config.intra_attention_width, config.intra_mamba_width
        self.fusion = config.intra_fusion
        self.head_dim = config.head_dim
        self.heads = self.aw // self.head_dim
        self.groups = config.intra_num_query_groups or self.heads
        self.qkv_width = (self.heads + 2 * self.groups) * self.head_dim if self.aw else 0
        in_width = self.qkv_width
        if self.mw:
            self.mamba = MambaCore(config, self.mw)
            in_width += self.mamba.in_width
        self.in_proj = nn.Linear(config.hidden_size, in_width, bias=False)
        for name, width in (("attention", self.aw), ("mamba", self.mw)):
            if not width:
                continue
            norm = (
                BranchRMSNorm(width, config.norm_epsilon) if config.intra_branch_norm == "rmsnorm" else None
            )
            setattr(self, f"{name}_norm", norm)
            if config.intra_branch_scalars:
                setattr(self, f"{name}_scale", nn.Parameter(torch.ones(())))
        fused = self.aw + self.mw if self.fusion == "concat" else max(self.aw, self.mw)
        self.out_proj = nn.Linear(fused, config.hidden_size, bias=False)

    def _finish(self, name, out):
        norm = getattr(self, f"{name}_norm", None)
        if norm is not None:
            out = norm(out)
        scale = getattr(self, f"{name}_scale", None)
        if scale is not None:
            out = out * scale
        return out

    def forward(self, x, cache, layer_idx):
        fused = self.in_proj(x)
        branches = {}
        if self.aw:
            attn = attention_core(
                fused[..., : self.qkv_width],
                self.heads,
                self.groups,
                self.head_dim,
                self.config,
                cache,
                layer_idx,
            )
            branches["attention"] = self._finish("attention", attn)
        if self.mw:
            branches["mamba"] = self._finish(
                "mamba", self.mamba(fused[..., self.qkv_width :], cache, layer_idx)
            )
        if len(branches) == 1:
            out = next(iter(branches.values()))
        elif self.fusion == "add":
            out = branches["attention"] + branches["mamba"]
        elif self.fusion == "subtract":
            out = branches["attention"] - branches["mamba"]
        else:
            out = torch.cat([branches["attention"], branches["mamba"]], dim=-1)
        return self.out_proj(out)


class SwiGLU(nn.Module):
    """linear_fc1 = [gate; up] rows; silu(gate) * up; linear_fc2."""

    def __init__(self, hidden, inner):
        super().__init__()
        self.linear_fc1 = nn.Linear(hidden, 2 * inner, bias=False)
        self.linear_fc2 = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class Router(nn.Module):
    """Linear router (fp32 logits); softmax over the top-k logits (or top-k of the softmax)."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.moe_num_experts, config.hidden_size))


class Experts(nn.Module):
    """Container mirroring megatron-core's ``experts.local_experts.{e}`` names."""

    def __init__(self, config):
        super().__init__()
        inner = config.moe_ffn_hidden_size or config.ffn_hidden_size
        self.local_experts = nn.ModuleList(
            SwiGLU(config.hidden_size, inner) for _ in range(config.moe_num_experts)
        )


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts plus optional shared SwiGLU expert."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_shared_expert_ffn_hidden_size)
            if config.moe_shared_expert_ffn_hidden_size
            else None
        )

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = F.linear(flat.float(), self.router.weight.float())
        k = self.config.moe_top_k
        if self.config.moe_pre_softmax:
            probs, idx = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
        else:
            top, idx = torch.topk(logits, k, dim=-1)
            probs = torch.softmax(top, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts.local_experts):
            rows, slot = torch.nonzero(idx == e, as_tuple=True)
            if rows.numel():
                y = expert(flat[rows]) * probs[rows, slot, None].to(flat.dtype)
                out.index_add_(0, rows, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


class Block(nn.Module):
    """One block: norm + mixer + residual, then (optionally) norm + FFN + residual."""

    def __init__(self, config, letter):
        super().__init__()
        eps = config.norm_epsilon
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        if letter == "A":
            self.self_attention = Attention(config)
        elif letter == "M":
            self.self_attention = MambaMixer(config)
        elif letter == "H":
            self.self_attention = IntraHybridMixer(config)
        else:
            raise ValueError(f"unknown layer letter {letter!r}")
        self.has_ffn = letter != "M" or config.mamba_block_ffn
        if self.has_ffn:
            self.pre_mlp_layernorm = RMSNorm(config.hidden_size, eps)
            self.mlp = (
                MoE(config) if config.moe_num_experts else SwiGLU(config.hidden_size, config.ffn_hidden_size)
            )

    def forward(self, x, cache, layer_idx):
        x = x + self.self_attention(self.input_layernorm(x), cache, layer_idx)
        if self.has_ffn:
            x = x + self.mlp(self.pre_mlp_layernorm(x))
        return x


class Embedding(nn.Module):
    """megatron-core's ``embedding.word_embeddings`` naming."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)


class Decoder(nn.Module):
    """``decoder.layers`` + ``decoder.final_layernorm``."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(Block(config, letter) for letter in config.layer_pattern)
        self.final_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon)


class HybridMegatronPreTrainedModel(PreTrainedModel):
    """Base class: config class, init (only used for weights absent from a checkpoint)."""

    config_class = HybridMegatronConfig
    base_model_prefix = "decoder"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        # Every weight comes from the export; this only gives deterministic values otherwise.
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class HybridMegatronForCausalLM(HybridMegatronPreTrainedModel, GenerationMixin):
    """Causal LM: embedding, blocks, final norm, output layer (tied to the embedding or not)."""

    def __init__(self, config):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.decoder = Decoder(config)
        # Tied models have no output_layer: the embedding matrix is used directly, so tying
        # never depends on transformers' tying machinery.
        self.output_layer = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # The cache is HybridMegatronCache (K/V + SSM states), created in forward.
        return False

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.output_layer

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, use_cache=True, **kwargs
    ):
        """Feed only the tokens the cache has not seen yet."""
        if past_key_values is not None and past_key_values.seen:
            input_ids = input_ids[:, past_key_values.seen :]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "use_cache": use_cache}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: HybridMegatronCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        """Logits [b, s, vocab] (fp32) for ``input_ids`` [b, s]; with ``use_cache`` a cache."""
        x = inputs_embeds if inputs_embeds is not None else self.embedding.word_embeddings(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = HybridMegatronCache(len(self.decoder.layers))
        cache = past_key_values if use_cache or past_key_values is not None else None
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, cache, i)
        x = self.decoder.final_layernorm(x)
        weight = (
            self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight
        )
        logits = F.linear(x, weight).float()
        if cache is not None:
            cache.seen += x.shape[1]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
