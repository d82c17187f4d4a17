"""Model family: megatron-core specs for the five kinds and ``build_model``."""

from hybrid_megatron.models.builder import build_model
from hybrid_megatron.models.layer_pattern import PatternError, build_layer_pattern, split_pattern

__all__ = ["build_model", "build_layer_pattern", "split_pattern", "PatternError"]
