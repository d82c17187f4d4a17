"""Imports flow one way through the package: a layer imports only itself and the layers below.

``LAYERS`` is the one list of the layers, bottom first. A unit is a top-level module or
subpackage of ``hybrid_megatron`` (``hybrid_megatron`` itself stands for the package's
``__init__``); the units of one row are independent, so none imports another of its row. Every
import counts: module level or inside a function, absolute or relative, and
``importlib.import_module`` / ``__import__`` of a literal name. A new module fails the test until
it is given a row.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "hybrid_megatron"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
RECIPES = PACKAGE_DIR.parent / "recipes"

LAYERS: tuple[tuple[str, ...], ...] = (
    # the package's __init__: it runs before any of its modules, so it imports none of them
    (PACKAGE,),
    # no imports from the package: the error base, logging, file and process helpers (warning
    # filters among them), kernels
    ("errors", "logs", "atomic_output", "cuda_memory", "torch_compile", "known_warnings", "ops"),
    # the recipe and its pure facts (pattern, geometry, parallel layout); megatron-core's CPU shims
    ("config", "compat"),
    # the process set-up that entry points (any package's __main__) call first
    ("runtime",),
    # parameters, FLOPs and cache of a recipe
    ("accounting",),
    # megatron-core builders; datasets and tokenizers; MLflow; where checkpoints lie
    ("models", "data", "tracking", "checkpoint_layout"),
    ("training",),
    ("convert", "evaluation", "scaling"),
    # the launcher: recipes to SLURM or local jobs (sweeps from scaling), ranks enter training by name
    ("launch",),
)


def unit_of(module: str, package_dir: Path = PACKAGE_DIR) -> str | None:
    """The unit a dotted module name belongs to, or None outside the package.

    ``from hybrid_megatron import x`` names ``hybrid_megatron.x``: the unit ``x`` when it is a
    module or subpackage, else the package's ``__init__``.
    """
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return PACKAGE
    name = parts[1]
    if (package_dir / name).is_dir() or (package_dir / f"{name}.py").is_file():
        return name
    return PACKAGE


def _module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, package_dir: Path = PACKAGE_DIR) -> Iterator[tuple[int, str]]:
    """(line, dotted module name) of every import in the file, wherever it sits in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path, package_dir)
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop] if drop else base
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            if module == PACKAGE:  # ``from hybrid_megatron import unit``
                for alias in node.names:
                    yield node.lineno, f"{module}.{alias.name}"
            else:
                yield node.lineno, module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if (
                called in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                yield node.lineno, first.value


def layer_violations(package_dir: Path = PACKAGE_DIR, layers=LAYERS) -> list[str]:
    """One line per import that goes up or sideways, and per unit in no layer."""
    rank = {unit: i for i, row in enumerate(layers) for unit in row}
    problems = []
    for path in sorted(package_dir.rglob("*.py")):
        source = unit_of(_module_name(path, package_dir), package_dir)
        if source not in rank:
            problems.append(f"{path.relative_to(package_dir.parent)}: unit {source!r} is in no row of LAYERS")
            continue
        for line, module in imported_modules(path, package_dir):
            target = unit_of(module, package_dir)
            if target is None or target == source:
                continue
            if target not in rank:
                problems.append(
                    f"{path.relative_to(package_dir.parent)}:{line}: imports {module}, "
                    f"whose unit {target!r} is in no row of LAYERS"
                )
            elif rank[target] >= rank[source]:
                where = "a higher layer" if rank[target] > rank[source] else "its own row"
                problems.append(
                    f"{path.relative_to(package_dir.parent)}:{line}: {source} imports "
                    f"{module} ({target}, {where})"
                )
    return sorted(set(problems))


def test_imports_flow_down_the_layers():
    problems = layer_violations()
    assert not problems, "imports against the layering (tests/test_layering.py):\n" + "\n".join(problems)


def test_checker_reports_upward_sideways_and_unlisted_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    for sub in ("low", "mid", "side", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text(
        "def f():\n    from hybrid_megatron.high import x\n"  # deferred, still counted
    )
    (pkg / "low" / "b.py").write_text("import importlib\nimportlib.import_module('hybrid_megatron.mid.y')\n")
    (pkg / "mid" / "c.py").write_text(
        "from ..side import z\nfrom . import c2\nfrom hybrid_megatron import low\n"
    )
    (pkg / "high" / "d.py").write_text("from hybrid_megatron import mid, extra\n")
    (pkg / "extra.py").write_text("")
    layers = (("low",), ("mid", "side"), ("high",), (PACKAGE,))
    problems = layer_violations(pkg, layers)
    assert problems == sorted(
        [
            "hybrid_megatron/extra.py: unit 'extra' is in no row of LAYERS",
            "hybrid_megatron/high/d.py:1: imports hybrid_megatron.extra, "
            "whose unit 'extra' is in no row of LAYERS",
            "hybrid_megatron/low/a.py:2: low imports hybrid_megatron.high (high, a higher layer)",
            "hybrid_megatron/low/b.py:2: low imports hybrid_megatron.mid.y (mid, a higher layer)",
            "hybrid_megatron/mid/c.py:1: mid imports hybrid_megatron.side (side, its own row)",
        ]
    )


def test_every_row_names_a_unit_once():
    units = [unit for row in LAYERS for unit in row]
    assert len(units) == len(set(units))


def test_config_and_accounting_run_without_torch():
    """Validating every shipped recipe and accounting for its model loads neither torch nor
    megatron-core (the launcher does both on a login node before it submits)."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from hybrid_megatron.accounting import count_parameters, training_flops
        from hybrid_megatron.config import load_recipe
        recipes = [p for p in sorted(Path({str(RECIPES)!r}).glob("*.yaml")) if not p.name.startswith("_")]
        for path in recipes:
            recipe = load_recipe(path)
            count_parameters(recipe.model), training_flops(recipe.model, recipe.data.seq_length)
        heavy = sorted(
            m for m in sys.modules if m.split(".")[0] in ("torch", "megatron", "transformer_engine")
        )
        print(len(recipes) > 10, heavy[:5])
    """)
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_DIR.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True []"
