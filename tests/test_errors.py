"""Every error a user can cause is an InputError (one base class to catch), and keeps the
builtin base its callers catch."""

from __future__ import annotations

import pytest

from hybrid_megatron.accounting.layout_plan import LayoutError
from hybrid_megatron.accounting.step_time import UnknownGpuError
from hybrid_megatron.config.errors import ModelConfigError, RecipeError
from hybrid_megatron.config.layer_pattern import PatternError
from hybrid_megatron.convert.exactness import NotExactError
from hybrid_megatron.convert.writer import ExportError
from hybrid_megatron.data.errors import DataToolsError
from hybrid_megatron.errors import InputError
from hybrid_megatron.evaluation.mlflow_log import RunNotInStoreError
from hybrid_megatron.launch.plan import UsageError
from hybrid_megatron.scaling.claims import ClaimsError
from hybrid_megatron.scaling.runs import RunsError, TooFewRunsError
from hybrid_megatron.tracking.spool import NoSpoolError
from hybrid_megatron.tracking.store import TrackingServerError
from hybrid_megatron.training.checkpoint import CheckpointError

# class -> the builtin base existing callers catch (pydantic turns a ValueError raised in a
# validator into one line of the recipe's error; Exception: none beyond InputError).
USER_ERRORS = {
    RecipeError: ValueError,
    ModelConfigError: ValueError,
    PatternError: ValueError,
    DataToolsError: Exception,
    CheckpointError: RuntimeError,
    RunsError: ValueError,
    TooFewRunsError: ValueError,
    ClaimsError: ValueError,
    NotExactError: ValueError,
    ExportError: RuntimeError,
    UsageError: Exception,
    LayoutError: ValueError,
    UnknownGpuError: ValueError,
    NoSpoolError: Exception,
    TrackingServerError: Exception,
    RunNotInStoreError: Exception,
}


@pytest.mark.parametrize("cls", list(USER_ERRORS), ids=lambda cls: cls.__name__)
def test_every_user_error_is_caught_by_the_base_class(cls):
    with pytest.raises(InputError, match="^model.hidden_size: must be positive$") as caught:
        raise cls("model.hidden_size: must be positive")
    assert type(caught.value) is cls
    assert isinstance(caught.value, USER_ERRORS[cls])


def test_the_list_above_is_every_user_error_of_the_package():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    ours = {cls for cls in subclasses(InputError) if cls.__module__.startswith("hybrid_megatron.")}
    assert ours == set(USER_ERRORS)


def test_model_config_error_in_a_recipe_is_one_line_of_its_recipe_error():
    from hybrid_megatron.config import load_recipe
    from tests.training_helpers import REPO

    with pytest.raises(RecipeError, match="model.vocab_size: .* does not split over parallel.tp=3"):
        load_recipe(REPO / "recipes" / "intra_tiny_moe.yaml", ["parallel.tp=3", "model.vocab_size=1000"])
