"""Recipe configuration: one pydantic v2 model per recipe section, and the whole `Recipe`.

``load_recipe(path, overrides)`` is the one way from YAML to a validated, frozen Recipe; see
``hybrid_megatron.config.recipe`` for the loading and path rules. Every section forbids
unknown keys; errors are `RecipeError` (a ValueError) naming the dotted path.
"""

from hybrid_megatron.config.checkpoint import CheckpointConfig
from hybrid_megatron.config.data import DataConfig
from hybrid_megatron.config.derived import derived, format_derived
from hybrid_megatron.config.errors import ModelConfigError, RecipeError
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.config.parallel import ParallelConfig
from hybrid_megatron.config.recipe import Recipe, load_recipe, validate_recipe
from hybrid_megatron.config.slurm import SlurmConfig
from hybrid_megatron.config.tracking import TrackingConfig
from hybrid_megatron.config.train import TrainConfig

__all__ = [
    "Recipe",
    "ModelConfigError",
    "RecipeError",
    "load_recipe",
    "validate_recipe",
    "derived",
    "format_derived",
    "ModelConfig",
    "ParallelConfig",
    "DataConfig",
    "TrainConfig",
    "CheckpointConfig",
    "TrackingConfig",
    "SlurmConfig",
]
