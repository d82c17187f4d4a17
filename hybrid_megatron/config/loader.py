"""Raw recipe text -> one merged mapping: YAML parsing, ``extends`` chains and CLI overrides.

No validation happens here (that is `hybrid_megatron.config.recipe`); this module only builds
the mapping and remembers which file (or ``override``) set each dotted path, so an error can
name the file to fix.

YAML numbers follow YAML 1.2, not PyYAML's YAML 1.1: ``3e-4`` and ``1e9`` are floats (1.1 reads
them as strings) and ``04:00:00`` stays a string (1.1 reads it as the base-60 integer 14400).
Duplicate keys in one mapping are errors (PyYAML silently keeps the last one).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from hybrid_megatron.config.errors import RecipeError

# Keys that describe one file and are therefore not inherited through `extends`.
PER_FILE_KEYS = ("name", "description")
OVERRIDE = "override"

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


class RecipeYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 number resolution and duplicate-key errors."""


RecipeYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeYamlLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"), list("-+0123456789")
)
RecipeYamlLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: RecipeYamlLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


RecipeYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def display_path(path: os.PathLike | str) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parse_value(text: str) -> Any:
    """Parse one override value as a YAML scalar or flow list/map (``3``, ``true``, ``[1, 2]``).

    Takes the text after ``=``; returns the Python value (empty text is None). Text that is not
    valid YAML is kept as a string, so ``run_name=a: b`` still works.
    """
    try:
        return yaml.load(text, Loader=RecipeYamlLoader)
    except yaml.YAMLError:
        return text


def read_yaml(path: Path, what: str = "recipe") -> dict:
    """Read one recipe (or sweep) file into a mapping; RecipeError naming the file if it is not
    one. ``what`` names the kind of file in the messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{display_path(path)}: not a UTF-8 text file (byte {err.start})") from None
    except FileNotFoundError:
        raise RecipeError(f"{display_path(path)}: {what} file not found") from None
    except OSError as err:
        raise RecipeError(f"{display_path(path)}: cannot read {what} file ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=RecipeYamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(f"{display_path(path)}:{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"{display_path(path)}: a {what} is a mapping of sections, got {type(data).__name__}"
        )
    return data


def _record(provenance: dict, value: Any, prefix: tuple, source: str) -> None:
    """Mark ``prefix`` and every path below it in ``value`` as set by ``source``.

    Re-inserting keeps the dict's order = order of setting, which `source_lookup` relies on.
    """
    provenance.pop(prefix, None)
    provenance[prefix] = source
    if isinstance(value, dict):
        for key, sub in value.items():
            _record(provenance, sub, prefix + (str(key),), source)


def deep_merge(base: dict, child: dict, provenance: dict, source: str, prefix: tuple = ()) -> dict:
    """Merge ``child`` over ``base`` (dicts merge recursively; anything else is replaced).

    Returns a new dict; records in ``provenance`` (path tuple -> source) what ``child`` set. A
    child's ``null`` replaces the base's value (``moe: null`` removes an inherited MoE).
    """
    out = copy.deepcopy(base)
    for key, value in child.items():
        path = prefix + (str(key),)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, provenance, source, path)
            provenance.setdefault(path, source)
        else:
            # Forget what the base said below this key: it is gone.
            for stale in [p for p in provenance if p[: len(path)] == path]:
                del provenance[stale]
            out[key] = copy.deepcopy(value)
            _record(provenance, value, path, source)
    return out


def load_chain(path: Path, provenance: dict, _stack: list[Path] | None = None) -> dict:
    """Read ``path`` and everything it ``extends`` (relative to the extending file), merged.

    Returns the merged mapping without the ``extends`` key; the per-file keys (name,
    description) come only from ``path`` itself when it is the first file of the chain.
    Raises RecipeError for a cycle, naming every file in it.
    """
    path = path.resolve()
    stack = list(_stack or [])
    if path in stack:
        cycle = " -> ".join(display_path(p) for p in stack[stack.index(path) :] + [path])
        raise RecipeError(f"{display_path(stack[0])}: extends cycle: {cycle}")
    stack.append(path)
    data = read_yaml(path)
    parent = data.pop("extends", None)
    merged: dict = {}
    if parent is not None:
        if not isinstance(parent, str) or not parent.strip():
            raise RecipeError(f"{display_path(path)}: extends: expected a file name, got {parent!r}")
        parent_path = (path.parent / os.path.expanduser(parent)).resolve()
        if not parent_path.exists():
            raise RecipeError(f"{display_path(path)}: extends: {parent} not found (looked for {parent_path})")
        merged = load_chain(parent_path, provenance, stack)
        for key in PER_FILE_KEYS:
            merged.pop(key, None)
            for stale in [p for p in provenance if p[:1] == (key,)]:
                del provenance[stale]
    return deep_merge(merged, data, provenance, display_path(path))


def split_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (``['a', 'b', 'c']``, parsed value); RecipeError if malformed."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. train.lr=3e-4")
    if key.split(".")[0] == "extends":
        raise RecipeError(f"override {text!r}: extends cannot be overridden; edit the recipe file")
    return key.split("."), parse_value(raw)


def apply_overrides(data: dict, overrides: Iterable[str], provenance: dict) -> dict:
    """Apply ``a.b.c=value`` overrides to a copy of ``data`` (missing mappings are created).

    Integer parts index lists (``data.blend.0.weight=2``). Returns the new mapping; records the
    overridden paths as ``override`` in ``provenance``. RecipeError names the bad override.
    """
    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = split_override(text)
        node: Any = out
        for depth, key in enumerate(keys[:-1]):
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                node = _list_item(node, key, where, text)
                continue
            if node.get(key) is None:
                node[key] = {}
            if not isinstance(node[key], (dict, list)):
                raise RecipeError(f"override {text!r}: {where} is {node[key]!r}, not a mapping")
            node = node[key]
        last = keys[-1]
        if isinstance(node, list):
            index = _index(node, last, ".".join(keys), text)
            node[index] = value
        else:
            node[last] = value
        path = tuple(keys)
        for stale in [p for p in provenance if p[: len(path)] == path]:
            del provenance[stale]
        _record(provenance, value, path, OVERRIDE)
    return out


def _index(items: list, key: str, where: str, text: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise RecipeError(f"override {text!r}: {where}: no list item {key} (the list has {len(items)})")
    return int(key)


def _list_item(items: list, key: str, where: str, text: str) -> Any:
    item = items[_index(items, key, where, text)]
    if not isinstance(item, (dict, list)):
        raise RecipeError(f"override {text!r}: {where} is {item!r}, not a mapping")
    return item


def source_lookup(provenance: dict, default: str):
    """A function mapping a location tuple to the file (or ``override``) most likely to blame.

    That is the source that set something at or below the location last (an override beats
    the file it overrides, a child beats its base), else the source of its longest known
    prefix, else ``default``.
    """

    def source_of(loc: tuple) -> str:
        parts = tuple(str(p) for p in loc)
        if parts:
            for path, source in reversed(provenance.items()):
                if path[: len(parts)] == parts:
                    return source
        for end in range(len(parts), 0, -1):
            if parts[:end] in provenance:
                return provenance[parts[:end]]
        return default

    return source_of
