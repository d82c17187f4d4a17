"""Which block type goes at which depth, and which pipeline stage builds which blocks.

Pure facts about the block letters (no megatron-core): the recipe's validation, the accounting,
the builders and the exporters all read them here. Each letter is one megatron-core
TransformerLayer: ``A``, ``M`` and ``H`` are a mixer sublayer plus its FFN sublayer (an ``M``
block only when ``mamba_block_ffn``); ``*``, ``-`` and ``E`` (flavour nemotron_h, NemotronH's
and megatron-core's hybrid-pattern letters) are a single sublayer.
"""

from __future__ import annotations

from collections.abc import Sequence

from hybrid_megatron.config.model import ModelConfig, parse_ratio
from hybrid_megatron.errors import InputError

ATTENTION = "A"  # self-attention mixer + FFN (Transformer block)
MAMBA = "M"  # Mamba2 mixer (+ FFN with mamba_block_ffn)
INTRA = "H"  # intra-layer hybrid mixer (attention and Mamba2 branches side by side) + FFN
ATTENTION_ONLY = "*"  # self-attention mixer alone
MLP_ONLY = "-"  # dense FFN alone
MOE_ONLY = "E"  # MoE FFN alone

BLOCK_LETTERS = (ATTENTION, MAMBA, INTRA, ATTENTION_ONLY, MLP_ONLY, MOE_ONLY)
LETTER_ORDER = "".join(BLOCK_LETTERS)  # the order reports list block types in
BLOCK_NAMES = {
    ATTENTION: "attention",
    MAMBA: "mamba2",
    INTRA: "intra hybrid",
    ATTENTION_ONLY: "attention only",
    MLP_ONLY: "MLP only",
    MOE_ONLY: "MoE only",
}
ATTENTION_LETTERS = (ATTENTION, ATTENTION_ONLY)  # letters whose mixer is (only) self-attention
FFN_ONLY_LETTERS = (MLP_ONLY, MOE_ONLY)  # letters without a mixer
SINGLE_SUBLAYER_LETTERS = (ATTENTION_ONLY, MLP_ONLY, MOE_ONLY)  # flavour nemotron_h only

# Layout letters each kind accepts (flavour nemotron_h adds the single-sublayer ones).
_KIND_LETTERS = {
    "transformer": {ATTENTION},
    "swa": {ATTENTION},
    "mamba": {MAMBA},
    "inter": {ATTENTION, MAMBA},
    "intra": {INTRA, MAMBA},
}
_NEMOTRON_H_LETTERS = {
    "transformer": set(SINGLE_SUBLAYER_LETTERS),
    "swa": set(SINGLE_SUBLAYER_LETTERS),
    "mamba": set(FFN_ONLY_LETTERS),
    "inter": set(SINGLE_SUBLAYER_LETTERS),
    "intra": set(),
}

# The block a hybrid kind is named for, and its letters: a layout without any is not that kind.
_KIND_OWN_LETTERS = {"inter": ("attention", ATTENTION_LETTERS), "intra": ("hybrid", (INTRA,))}


class PatternError(InputError, ValueError):
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
    not fit, a hybrid layout without its kind's own block, or attention in the first layers of
    an inter-layer hybrid (the paper's rule; lifted by ``pattern.allow_early_attention``).
    """
    n = cfg.num_layers
    p = cfg.pattern
    if p.layout is not None:
        pattern = _checked_layout(cfg)
    elif cfg.kind in ("transformer", "swa"):
        return ATTENTION * n
    elif cfg.kind == "mamba":
        return MAMBA * n
    else:
        special = ATTENTION if cfg.kind == "inter" else INTRA
        default_ratio = "1:5" if cfg.kind == "inter" else "1:0"
        a, m = parse_ratio(p.ratio or default_ratio, "model.pattern.ratio")
        count = round(n * a / (a + m))
        if a and count == 0:
            raise PatternError(f"model.pattern.ratio: {p.ratio} leaves no {special} block in {n} layers")
        place = _spread_even if p.placement == "even" else _centered
        chosen = set(place(n, count)) if count else set()
        pattern = "".join(special if i in chosen else MAMBA for i in range(n))

    if cfg.kind == "inter" and not p.allow_early_attention:
        early = p.early_layers if p.early_layers is not None else default_early_layers(n)
        first = min((i for i, c in enumerate(pattern) if c in ATTENTION_LETTERS), default=-1)
        if 0 <= first < early:
            raise PatternError(
                f"model.pattern: attention block at layer {first} is within the first {early} "
                f"layers ({pattern}); the paper finds early attention hurts quality. Move it, or "
                f"set model.pattern.allow_early_attention: true"
            )
    return pattern


def _checked_layout(cfg: ModelConfig) -> str:
    """``model.pattern.layout`` normalised (spaces dropped, upper case) and checked: its length,
    the letters the kind and flavour allow, and ``E`` only with ``model.moe``."""
    layout = cfg.pattern.layout.replace(" ", "").upper()
    n = cfg.num_layers
    if len(layout) != n:
        raise PatternError(f"model.pattern.layout: has {len(layout)} letters but model.num_layers is {n}")
    allowed = set(_KIND_LETTERS[cfg.kind])
    if cfg.flavour == "nemotron_h":
        allowed |= _NEMOTRON_H_LETTERS[cfg.kind]
    bad = sorted(set(layout) - allowed)
    if bad:
        hint = ""
        if set(bad) & set(SINGLE_SUBLAYER_LETTERS) and cfg.flavour != "nemotron_h":
            hint = "; the single-sublayer letters * - E need model.flavour nemotron_h"
        raise PatternError(
            f"model.pattern.layout: letters {bad} not allowed for kind {cfg.kind!r} "
            f"(allowed: {sorted(allowed)}){hint}"
        )
    if MOE_ONLY in layout and cfg.moe is None:
        raise PatternError("model.pattern.layout: letter E (an MoE layer) needs model.moe")
    if cfg.kind in _KIND_OWN_LETTERS:
        special, letters = _KIND_OWN_LETTERS[cfg.kind]
        if not set(layout) & set(letters):
            raise PatternError(
                f"model.pattern.layout: {layout} has no {special} block, and kind {cfg.kind} "
                f"needs at least one; a model of Mamba blocks only is kind mamba"
            )
    return layout


def has_ffn(cfg: ModelConfig, letter: str) -> bool:
    """Whether a block of this letter carries an FFN sublayer (Mamba blocks only when
    ``mamba_block_ffn``; attention-only ``*`` layers never)."""
    if letter == MAMBA:
        return cfg.mamba_block_ffn
    return letter != ATTENTION_ONLY


def has_mixer(letter: str) -> bool:
    """Whether a block of this letter has a mixer sublayer (with its input norm): all but the
    FFN-only ``-`` and ``E`` layers."""
    return letter not in FFN_ONLY_LETTERS


def ffn_is_moe(cfg: ModelConfig, letter: str) -> bool:
    """Whether the FFN of a block of this letter is an MoE: always for ``E``, never for the
    dense ``-``, for the other letters when ``model.moe`` is set."""
    if letter == MLP_ONLY:
        return False
    return letter == MOE_ONLY or cfg.moe is not None


def split_pattern(pattern: str, pp_size: int, stage_layers: Sequence[int] | None = None) -> list[str]:
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
            f"parallel.pipeline_stage_layers: {stage_layers} must be {pp_size} positive counts summing to {n}"
        )
    out, start = [], 0
    for count in stage_layers:
        out.append(pattern[start : start + count])
        start += count
    return out
