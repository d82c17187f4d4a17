"""Model family: megatron-core specs for the five kinds and ``build_model``."""

from hybrid_megatron.models.builder import build_model

__all__ = ["build_model"]
