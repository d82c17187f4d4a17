"""Which block type goes at which depth, and which pipeline stage builds which blocks.

Block letters: ``A`` attention (Transformer) block, ``M`` Mamba2 block, ``H`` intra-layer hybrid
block. Each block is one mixer sublayer plus its FFN sublayer.
"""

from __future__ import annotations

from typing import Optional, Sequence

from hybrid_megatron.config.model import ModelConfig, parse_ratio

BLOCK_LETTERS = ("A", "M", "H")


class PatternError(ValueError):
    """A layer pattern that cannot be built; the message names the recipe field."""


def _spread_even(num_layers: int, count: int) -> list[int]:
    """Indices of ``count`` layers spread evenly, each the last of its group of L/count layers.

    Ending each group (rather than starting it) keeps the special blocks out of layer 0.
    """
    return [((k + 1) * num_layers) // count - 1 for k in range(count)]


def _centered(num_layers: int, count: int) -> list[int]:
    """Indices of ``count`` consecutive layers centred in the stack."""
    start = (num_layers - count) // 2
    return list(range(start, start + count))


def default_early_layers(num_layers: int) -> int:
    """Depth guarded against attention when the recipe gives none: max(1, L // 8)."""
    return max(1, num_layers // 8)


def build_layer_pattern(cfg: ModelConfig) -> str:
    """Resolve the model's block pattern.

    Takes a validated ModelConfig; returns a string of ``num_layers`` block letters.
    Raises PatternError naming the field for a wrong length, unknown letters, a ratio that does
    not fit, or attention in the first layers of an inter-layer hybrid (the paper's rule; lifted
    by ``pattern.allow_early_attention``).
    """
    n = cfg.num_layers
    if cfg.kind in ("transformer", "swa"):
        return "A" * n
    if cfg.kind == "mamba":
        return "M" * n

    special = "A" if cfg.kind == "inter" else "H"
    p = cfg.pattern
    if p.layout is not None:
        layout = p.layout.replace(" ", "").upper()
        if len(layout) != n:
            raise PatternError(
                f"model.pattern.layout: has {len(layout)} letters but model.num_layers is {n}"
            )
        allowed = {"A", "M"} if cfg.kind == "inter" else {"H", "M"}
        bad = sorted(set(layout) - allowed)
        if bad:
            raise PatternError(
                f"model.pattern.layout: letters {bad} not allowed for kind {cfg.kind!r} "
                f"(allowed: {sorted(allowed)})"
            )
        pattern = layout
    else:
        default_ratio = "1:5" if cfg.kind == "inter" else "1:0"
        a, m = parse_ratio(p.ratio or default_ratio, "model.pattern.ratio")
        count = round(n * a / (a + m))
        if a and count == 0:
            raise PatternError(
                f"model.pattern.ratio: {p.ratio} leaves no {special} block in {n} layers"
            )
        place = _spread_even if p.placement == "even" else _centered
        chosen = set(place(n, count)) if count else set()
        pattern = "".join(special if i in chosen else "M" for i in range(n))

    if cfg.kind == "inter" and not p.allow_early_attention:
        early = p.early_layers if p.early_layers is not None else default_early_layers(n)
        first = pattern.find("A")
        if 0 <= first < early:
            raise PatternError(
                f"model.pattern: attention block at layer {first} is within the first {early} "
                f"layers ({pattern}); the paper finds early attention hurts quality. Move it, or "
                f"set model.pattern.allow_early_attention: true"
            )
    return pattern


def split_pattern(
    pattern: str, pp_size: int, stage_layers: Optional[Sequence[int]] = None
) -> list[str]:
    """Split a pattern across pipeline stages.

    Takes the full pattern, the pipeline size and optional explicit per-stage layer counts;
    returns one sub-pattern per stage. Without explicit counts the split is even (an error if
    the layers do not divide). Raises PatternError naming ``parallel.pipeline_stage_layers``.
    """
    n = len(pattern)
    if stage_layers is None:
        if n % pp_size:
            raise PatternError(
                f"parallel.pp: {n} layers do not split evenly over {pp_size} stages; "
                f"give parallel.pipeline_stage_layers"
            )
        stage_layers = [n // pp_size] * pp_size
    stage_layers = list(stage_layers)
    if len(stage_layers) != pp_size or sum(stage_layers) != n or min(stage_layers) < 1:
        raise PatternError(
            f"parallel.pipeline_stage_layers: {stage_layers} must be {pp_size} positive counts "
            f"summing to {n}"
        )
    out, start = [], 0
    for count in stage_layers:
        out.append(pattern[start : start + count])
        start += count
    return out
