"""Every tool is a package module: a console script of pyproject.toml, ``python -m`` of that module,
and the documented script (launch/slurm.py, data_tools/*.py) calls the same ``main``. No file in
the repository reaches code by file path, edits the import path or pickles code by value."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
import tomllib

import pytest

from tests.training_helpers import REPO

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
# The documented commands: each calls the main of one console script.
THIN_SCRIPTS = {
    "launch/slurm.py": "hybrid-megatron-launch",
    "data_tools/preprocess.py": "hybrid-megatron-preprocess",
    "data_tools/train_tokenizer.py": "hybrid-megatron-train-tokenizer",
    "data_tools/inspect_dataset.py": "hybrid-megatron-inspect",
}
LOADERS = {
    "spec_from_file_location",
    "SourceFileLoader",
    "SourcelessFileLoader",
    "run_path",
    "load_source",
    "register_pickle_by_value",
    "addsitedir",
}
PATH_EDITS = {"insert", "append", "extend", "remove", "pop", "clear", "__setitem__"}


def _is_sys_path(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    )


def import_hacks(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each file-path load, import-path edit or pickle-by-value in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in LOADERS:
                found.append((node.lineno, name))
            elif isinstance(func, ast.Attribute) and func.attr in PATH_EDITS and _is_sys_path(func.value):
                found.append((node.lineno, f"sys.path.{func.attr}"))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if _is_sys_path(target) or (isinstance(target, ast.Subscript) and _is_sys_path(target.value)):
                    found.append((node.lineno, "sys.path assignment"))
    return sorted(found)


def _python_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "runs", "build")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(root, name)


def test_the_hack_finder_finds_each_kind():
    planted = (
        "import sys, importlib.util, cloudpickle, runpy\n"
        "sys.path.insert(0, 'x')\n"
        "sys.path[:] = []\n"
        "sys.path += ['y']\n"
        "spec = importlib.util.spec_from_file_location('m', 'm.py')\n"
        "cloudpickle.register_pickle_by_value(sys.modules[__name__])\n"
        "runpy.run_path('tool.py')\n"
        "print(sys.path[0], 'sys.path.insert(0, x)')\n"  # reading it, or the words in a string: fine
    )
    assert [line for line, _ in import_hacks(planted)] == [2, 3, 4, 5, 6, 7]


def test_no_file_loads_code_by_path_edits_the_import_path_or_pickles_by_value():
    files = list(_python_files())
    assert len(files) > 100  # the walk saw the repository
    offenders = [
        f"{os.path.relpath(path, REPO)}:{line}: {what}"
        for path in files
        for line, what in import_hacks(open(path, encoding="utf-8").read())
    ]
    assert offenders == []


def test_console_scripts_are_the_package_mains():
    assert sorted(SCRIPTS) == sorted(
        [
            "hybrid-megatron-launch",
            "hybrid-megatron-train",
            "hybrid-megatron-train-tokenizer",
            "hybrid-megatron-preprocess",
            "hybrid-megatron-inspect",
            "hybrid-megatron-accounting",
            "hybrid-megatron-convert",
            "hybrid-megatron-evaluate",
            "hybrid-megatron-scaling",
        ]
    )
    for name, target in SCRIPTS.items():
        module_name, _, function = target.partition(":")
        assert module_name.startswith("hybrid_megatron.") and function == "main", name
        assert callable(getattr(importlib.import_module(module_name), function)), name


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_tool_prints_its_usage_and_runs_as_a_module(name, capsys):
    module_name, _, function = SCRIPTS[name].partition(":")
    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as stop:
        getattr(module, function)(["--help"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: "), name
    # `python -m <module>` (a package's __main__, or the module itself) ends in the same main.
    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    guards = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"
    ]
    assert len(guards) == 1 and ast.unparse(guards[0].body[0]) == "sys.exit(main())", name


@pytest.mark.parametrize("script", sorted(THIN_SCRIPTS))
def test_documented_scripts_call_the_console_scripts_main(script):
    tree = ast.parse((REPO / script).read_text())
    imports = [
        f"{node.module}:{alias.name}"
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    ]
    assert imports == [SCRIPTS[THIN_SCRIPTS[script]]], script
    # Nothing but the docstring, `import sys`, the import of main and the __main__ guard.
    assert len([node for node in tree.body if not isinstance(node, ast.Expr)]) == 3


def test_the_launcher_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "hybrid_megatron.launch", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: launch/slurm.py") and "--sweep" in done.stdout


# A warning as the `warnings` module prints it: "<file>:<line>: <Category>: <message>".
WARNING_LINE = re.compile(r"^\S.*:\d+: \w*Warning: ", re.MULTILINE)


def _stderr_warnings(argv: list[str]) -> list[str]:
    done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stderr.splitlines() if WARNING_LINE.match(line)]


def test_the_warning_finder_finds_a_printed_warning():
    assert len(_stderr_warnings(["-c", "import warnings; warnings.warn('planted', FutureWarning)"])) == 1


@pytest.mark.parametrize(
    "argv",
    [["-m", SCRIPTS[name].partition(":")[0], "--help"] for name in sorted(SCRIPTS)]
    + [[script, "--help"] for script in sorted(THIN_SCRIPTS)]
    + [["-m", "hybrid_megatron.training", "--help"]],
    ids=lambda argv: " ".join(argv),
)
def test_each_tool_prints_no_warnings_on_help(argv):
    assert _stderr_warnings(argv) == []


def test_an_ordinary_command_prints_no_library_warnings():
    # The launcher's dry run builds the recipe's plan, importing megatron-core (whose import
    # announces its missing Transformer Engine and apex on a CPU machine).
    assert _stderr_warnings(["launch/slurm.py", "recipes/intra_tiny.yaml", "--dry-run"]) == []
