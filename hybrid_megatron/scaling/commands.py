"""The command lines that come next after a sweep, with every value filled in (printed by the
launcher after a sweep and by ``fit`` when it refuses too few runs)."""

from __future__ import annotations

import shlex


def scaling_command(
    verb: str, tracking_uri: str, experiment: str, group: str | None, out: str | None = None
) -> str:
    """``python -m hybrid_megatron.scaling <verb> ...`` selecting the same runs, shell-quoted."""
    words = [
        "python",
        "-m",
        "hybrid_megatron.scaling",
        verb,
        "--tracking-uri",
        tracking_uri,
        "--experiment",
        experiment,
    ]
    if group is not None:
        words += ["--group", group]
    if out is not None:
        words += ["--out", out]
    return shlex.join(words)


def mlflow_ui_command(tracking_uri: str) -> str:
    """``mlflow ui`` on the runs' store (the artifacts' locations are recorded in it)."""
    return shlex.join(["mlflow", "ui", "--backend-store-uri", tracking_uri])
