"""The cluster image cannot drift from pyproject.toml (checked statically: no Docker engine here).

The Dockerfile must install the project itself, with its dependencies, the extras a cluster user
needs (`convert`, `eval`, and every `gpu` requirement that the base image's constraints file does
not keep), against the constraints file it generates from the base image; and it must write no
version of its own. README.md's image smoke command trains with options the recipe accepts.
"""

from __future__ import annotations

import re
import shlex
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.training_helpers import REPO

CONSTRAINTS = "/opt/base-constraints.txt"
NEEDED_EXTRAS = ("convert", "eval")  # besides the gpu requirements the base does not provide


def _commands(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    return [c.strip() for c in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if c.strip()]


def _expand(project: dict, extras: set[str]) -> list[Requirement]:
    """The requirements of ``extras``, self-references (``hybrid_megatron[x]``) expanded."""
    name = canonicalize_name(project["name"])
    found, todo, seen = [], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in project.get("optional-dependencies", {}).get(extra, []):
            req = Requirement(text)
            if canonicalize_name(req.name) == name:
                todo += sorted(req.extras)
            else:
                found.append(req)
    return found


def image_problems(dockerfile: str, pyproject: dict) -> list[str]:
    """What the image built from ``dockerfile`` would lack or pin twice; [] when it is whole."""
    project = pyproject["project"]
    commands = _commands(dockerfile)
    problems = []
    base = None  # the names the base image keeps: the grep filter that writes the constraints
    for command in commands:
        if CONSTRAINTS in command and "pip list --format=freeze" in command:
            match = re.search(r"grep -iE '([^']+)'", command)
            base = re.compile(match.group(1), re.IGNORECASE) if match else None
    if base is None:
        problems.append(f"no constraints file {CONSTRAINTS} generated from the base image's `pip list`")

    def kept(req: Requirement) -> bool:
        return base is not None and any(
            base.match(f"{n}==1") for n in (req.name, canonicalize_name(req.name))
        )

    installed: set[str] | None = None
    for command in commands:
        for pip in re.findall(r"pip install ([^&;]+)", command):
            words = shlex.split(pip)
            if "--no-deps" in words:
                problems.append(f"`pip install {pip.strip()}` installs without dependencies")
            for word in words:
                if re.match(r"^[A-Za-z0-9_.\-\[\],]+(==|>=|<=|~=|!=|<|>)\d", word):
                    problems.append(f"{word}: a version written in the Dockerfile (pyproject.toml has them)")
            project_install = [w for w in words if re.fullmatch(r"\.(\[[a-z0-9_,\-]*\])?", w)]
            if project_install:
                installed = (
                    set(filter(None, project_install[0][2:-1].split(",")))
                    if "[" in project_install[0]
                    else set()
                )
                if words[words.index("-c") + 1 if "-c" in words else 0] != CONSTRAINTS:
                    problems.append(f"the project is installed without -c {CONSTRAINTS}")
    if installed is None:
        return problems + ["the project is not installed from pyproject.toml (no `pip install .[...]`)"]
    for extra in NEEDED_EXTRAS:
        if extra not in installed:
            problems.append(f"extra {extra!r} not installed")
    present = {canonicalize_name(r.name) for r in _expand(project, installed)}
    for req in _expand(project, {"gpu"}):
        if canonicalize_name(req.name) not in present and not kept(req):
            problems.append(
                f"{req.name} (extra gpu) would be missing: neither installed nor kept from the base"
            )
    return problems


def _files():
    return (REPO / "Dockerfile").read_text(), tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_image_installs_everything_from_pyproject():
    dockerfile, pyproject = _files()
    assert image_problems(dockerfile, pyproject) == []


def test_the_hand_pinned_install_is_caught():
    """The image before this check: --no-deps and a hand-copied list that lacked convert/eval."""
    _, pyproject = _files()
    old = (
        "FROM base\n"
        "RUN pip install --no-cache-dir --no-build-isolation causal-conv1d==1.7.0 mamba-ssm==2.2.6.post3\n"
        'RUN pip install --no-cache-dir "megatron-core==0.16.1" && '
        "pip install --no-cache-dir --no-deps -e . \\\n"
        " && pip install --no-cache-dir einops==0.8.2 mlflow==3.17.2\n"
    )
    problems = image_problems(old, pyproject)
    assert problems[0].startswith("no constraints file /opt/base-constraints.txt")
    assert "causal-conv1d==1.7.0: a version written in the Dockerfile (pyproject.toml has them)" in problems
    assert "megatron-core==0.16.1: a version written in the Dockerfile (pyproject.toml has them)" in problems
    assert "`pip install --no-cache-dir --no-deps -e .` installs without dependencies" in problems
    assert "extra 'convert' not installed" in problems and "extra 'eval' not installed" in problems
    assert (
        "transformer-engine (extra gpu) would be missing: neither installed nor kept from the base"
        in problems
    )


@pytest.mark.parametrize(
    "edit, problem",
    [
        (
            ('".[kernels,convert,eval]"', '".[convert,eval]"'),
            ("mamba-ssm (extra gpu) would be missing", "causal-conv1d (extra gpu) would be missing"),
        ),
        (('".[kernels,convert,eval]"', '".[kernels,convert]"'), "extra 'eval' not installed"),
        (
            ("|transformer[-_]engine([-_](torch|cu[0-9]+))?", ""),
            "transformer-engine (extra gpu) would be missing",
        ),
        (
            ("-c /opt/base-constraints.txt -e", "-e"),
            "the project is installed without -c /opt/base-constraints.txt",
        ),
        (
            (
                "pip install --no-cache-dir --no-build-isolation",
                "pip install --no-cache-dir pydantic==2.14.3 --no-build-isolation",
            ),
            "pydantic==2.14.3: a version written in the Dockerfile (pyproject.toml has them)",
        ),
    ],
)
def test_each_drift_is_named(edit, problem):
    dockerfile, pyproject = _files()
    assert edit[0] in dockerfile
    problems = image_problems(dockerfile.replace(edit[0], edit[1]), pyproject)
    expected = (problem,) if isinstance(problem, str) else problem
    assert len(problems) == len(expected), problems
    assert all(p.startswith(e) for p, e in zip(problems, expected)), problems


def test_a_new_gpu_requirement_must_reach_the_image():
    dockerfile, pyproject = _files()
    pyproject["project"]["optional-dependencies"]["gpu"].append("flash-attn==2.8.3")
    assert image_problems(dockerfile, pyproject) == [
        "flash-attn (extra gpu) would be missing: neither installed nor kept from the base"
    ]


def test_readme_smoke_command_trains_a_valid_recipe(capsys):
    """The smoke command's training line, run with --dry-run here: the recipe and overrides load."""
    from hybrid_megatron.launch import cli

    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("docker run --rm --gpus all hybrid_megatron") :]
    line = next(line for line in block.splitlines() if line.startswith("python launch/slurm.py"))
    words = shlex.split(line)[2:]
    assert cli.main([str(REPO / words[0]), *words[1:], "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "impl: te" in out and "precision: bf16" in out and "budget    2 steps" in out
