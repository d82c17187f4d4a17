"""One accounting report of a model: parameters, training FLOPs and cache, as a table or JSON."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_megatron.accounting.cache import CacheReport, cache_bytes
from hybrid_megatron.accounting.flops import FlopReport, training_flops
from hybrid_megatron.accounting.params import ParamReport, count_parameters
from hybrid_megatron.config.layer_pattern import BLOCK_NAMES
from hybrid_megatron.config.model import ModelConfig

MIB = 1024 * 1024


@dataclass
class AccountingReport:
    """Parameters, training FLOPs at ``seq_len`` and inference cache at ``seq_len`` of one model."""

    cfg: ModelConfig
    params: ParamReport
    flops: FlopReport
    cache: CacheReport


def account(cfg: ModelConfig, seq_len: int, dtype_bytes: int = 2) -> AccountingReport:
    """Compute all three accounts of ``cfg`` at ``seq_len`` (cache elements of ``dtype_bytes``).

    Returns an AccountingReport.
    """
    return AccountingReport(
        cfg=cfg,
        params=count_parameters(cfg),
        flops=training_flops(cfg, seq_len),
        cache=cache_bytes(cfg, seq_len, dtype_bytes),
    )


def to_dict(report: AccountingReport) -> dict:
    """A JSON-ready dict of the report: per-block and total parameters, FLOPs and cache bytes.

    Per-block entries are per single block; ``count`` says how many the model has.
    """
    p, f, c = report.params, report.flops, report.cache
    blocks = {}
    for letter, bp in p.blocks.items():
        bf, bc = f.blocks[letter], c.blocks[letter]
        blocks[letter] = {
            "name": BLOCK_NAMES[letter],
            "count": bp.count,
            "params": {
                "mixer": bp.mixer,
                "norms": bp.norms,
                "ffn": bp.ffn,
                "ffn_active": bp.ffn_active,
                "total": bp.total,
                "active": bp.active,
            },
            "flops": {
                "forward_terms_per_sample": bf.terms,
                "mixer_forward_per_sample": bf.mixer_forward,
                "training_per_sample": bf.training_per_sample,
                "training_per_token": bf.training_per_token,
            },
            "cache_bytes": {
                "kv": bc.kv_bytes,
                "conv": bc.conv_bytes,
                "ssm": bc.ssm_bytes,
                "total": bc.total,
            },
        }
    return {
        "kind": report.cfg.kind,
        "flavour": report.cfg.flavour,
        "pattern": p.pattern,
        "seq_len": f.seq_len,
        "blocks": blocks,
        "params": {
            "embedding": p.embedding,
            "output_layer": p.output_layer,
            "final_norm": p.final_norm,
            **p.headline(),
        },
        "flops": {
            "lm_head_forward_per_sample": f.lm_head_forward,
            "forward_per_sample": f.forward_per_sample,
            "training_per_sample": f.training_per_sample,
            "training_per_token": f.training_per_token,
            "convention": "2 FLOPs per MAC, matmul/conv only, training = 3 x forward, "
            "causal attention counts sum_i min(i, window) key positions",
        },
        "cache": {"dtype_bytes": c.dtype_bytes, "total_bytes": c.total_bytes},
    }


def _count(n: float) -> str:
    """Human-readable count: 1.23B, 45.6M, 7.8K."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    """Bytes as MiB (or KiB for small amounts)."""
    return f"{n / MIB:.2f} MiB" if n >= MIB / 10 else f"{n / 1024:.1f} KiB"


def render_table(report: AccountingReport) -> str:
    """The report as readable text: one row per block type, totals, and the FLOP terms."""
    p, f, c = report.params, report.flops, report.cache
    lines = [
        f"kind {report.cfg.kind} (flavour {report.cfg.flavour}), {len(p.pattern)} blocks: {p.pattern}",
        f"sequence length {f.seq_len}, cache element {c.dtype_bytes} bytes",
        "",
        f"{'block':<16}{'count':>6}{'mixer':>10}{'block':>10}{'active':>10}"
        f"{'train FLOPs/tok':>17}{'train FLOPs/sample':>20}{'cache/seq':>14}",
    ]
    for letter, bp in p.blocks.items():
        bf, bc = f.blocks[letter], c.blocks[letter]
        lines.append(
            f"{letter + ' ' + BLOCK_NAMES[letter]:<16}{bp.count:>6}{_count(bp.mixer):>10}"
            f"{_count(bp.total):>10}{_count(bp.active):>10}{_count(bf.training_per_token):>17}"
            f"{_count(bf.training_per_sample):>20}{_bytes(bc.total):>14}"
        )
    head = 3 * f.lm_head_forward
    lines += [
        f"{'LM head':<16}{1:>6}{'':>10}{_count(p.output_layer):>10}{_count(p.output_layer):>10}"
        f"{_count(head / f.seq_len):>17}{_count(head):>20}{'':>14}",
        "",
        f"parameters: total {p.total:,} ({_count(p.total)}), active {p.active:,} "
        f"({_count(p.active)}), non-embedding {p.non_embedding:,}",
        f"  embedding {p.embedding:,}, output layer {p.output_layer:,}"
        f"{' (tied)' if report.cfg.tie_embeddings else ''}, final norm {p.final_norm:,}",
        f"training FLOPs (fwd+bwd = 3 x fwd): {_count(f.training_per_token)} per token, "
        f"{_count(f.training_per_sample)} per sample",
        f"inference cache per sequence at {f.seq_len} tokens: {_bytes(c.total_bytes)} "
        f"({c.total_bytes:,} bytes)",
        "",
        "forward FLOPs per sample of one block, by term:",
    ]
    for letter, bf in f.blocks.items():
        terms = ", ".join(f"{name} {_count(v)}" for name, v in bf.terms.items())
        lines.append(f"  {letter}: {terms}")
    return "\n".join(lines)
