"""The recipe's errors (RecipeError, ModelConfigError) and the translation of pydantic's
ValidationError into one line per problem.

A recipe author should read ``recipes/x.yaml: unknown field model.hiden_size (did you mean
hidden_size?)`` or ``model.intra.fusion: 'sum' is not one of add, subtract, concat``, never a
pydantic traceback. Every message starts with the dotted path of the offending field, prefixed
by the file (or ``override``) that set it when that is known.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from hybrid_megatron.errors import InputError


class RecipeError(InputError, ValueError):
    """A recipe that cannot be loaded or validated; the message names the dotted field path."""


class ModelConfigError(InputError, ValueError):
    """A model config that cannot be built on this parallel layout; names the recipe field.

    A ValueError, so that raised inside the recipe's validation it becomes one line of the
    RecipeError.
    """


# A message that already starts with a dotted field path ("model.attention: ...").
_PATH_PREFIX = re.compile(r"^[A-Za-z_][\w]*(\.[\w\[\]]+)*\s*:")


def dotted(loc: Sequence[Any]) -> str:
    """Join a pydantic location tuple into a dotted path: ``('data', 'blend', 0)`` -> ``data.blend.0``."""
    return ".".join(str(part) for part in loc)


def _strip(annotation: Any) -> Any:
    """Remove Optional[...] / Annotated[...] wrappers from a type annotation."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation


def annotation_at(model: type[BaseModel], loc: Sequence[Any]) -> Any:
    """The (unwrapped) type annotation of the field at ``loc`` inside ``model``, or None.

    Walks nested models, lists (integer parts) and dicts (any key). Used to list the allowed
    values of a Literal and the field names next to an unknown one.
    """
    current: Any = model
    for part in loc:
        current = _strip(current)
        origin = typing.get_origin(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif origin in (list, tuple, set, frozenset):
            args = typing.get_args(current)
            current = args[0] if args else Any
        elif origin is dict:
            args = typing.get_args(current)
            current = args[1] if len(args) == 2 else Any
        else:
            return None
    return _strip(current)


def allowed_values(model: type[BaseModel], loc: Sequence[Any]) -> list[str] | None:
    """The values a Literal field at ``loc`` accepts, as strings; None if it is no Literal."""
    annotation = annotation_at(model, loc)
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    return None


def field_names(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The field names of the model at ``loc`` (empty if ``loc`` is not a model)."""
    annotation = annotation_at(model, loc) if loc else model
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(model: type[BaseModel], error: Mapping[str, Any]) -> str:
    """One line for one pydantic error dict (from ``ValidationError.errors()``)."""
    loc = tuple(error.get("loc", ()))
    path = dotted(loc)
    kind = error.get("type", "")
    message = str(error.get("msg", ""))
    value = error.get("input")
    if kind == "extra_forbidden":
        known = field_names(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown field {path}{hint}"
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind in ("literal_error", "enum"):
        allowed = allowed_values(model, loc)
        if allowed is None:  # fall back on pydantic's own list ("'a', 'b' or 'c'")
            expected = str((error.get("ctx") or {}).get("expected", ""))
            allowed = [p.strip(" '\"") for p in re.split(r",| or ", expected) if p.strip()]
        return f"{path}: {_short(value)} is not one of {', '.join(allowed)}"
    if kind in ("value_error", "assertion_error"):
        text = re.sub(r"^(Value|Assertion) error,\s*", "", message)
        if _PATH_PREFIX.match(text) or not path:
            return text
        return f"{path}: {text}"
    where = path or "recipe"
    return f"{where}: {message[:1].lower()}{message[1:]} (got {_short(value)})"


def format_validation_error(
    model: type[BaseModel],
    err: ValidationError,
    source_of: Callable[[tuple], str | None] | None = None,
) -> str:
    """Turn a pydantic ValidationError into the user-facing text of a RecipeError.

    Takes the validated model class, the error and optionally a function mapping a location
    tuple to the file (or ``override``) that set it; returns one line per distinct problem,
    each ``SOURCE: MESSAGE`` where the source is known.
    """
    errors = err.errors(include_url=False)
    # A misspelt field also leaves the real one missing; "did you mean" already says so.
    suggested: set[tuple[Any, ...]] = set()
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "extra_forbidden" and loc:
            close = difflib.get_close_matches(str(loc[-1]), field_names(model, loc[:-1]), n=1)
            suggested.update(loc[:-1] + (name,) for name in close)
    lines: list[str] = []
    for error in errors:
        if error.get("type") == "missing" and tuple(error.get("loc", ())) in suggested:
            continue
        text = describe_error(model, error)
        loc = tuple(str(p) for p in error.get("loc", ()))
        named = _PATH_PREFIX.match(text)
        if named:
            # A validator's message names the field it is about, often more precisely than
            # its location (a model validator sits at its section, or at the root).
            text_loc = tuple(named.group(0).rstrip(": ").split("."))
            if text_loc[: len(loc)] == loc:
                loc = text_loc
        source = source_of(loc) if source_of else None
        line = f"{source}: {text}" if source else text
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)
