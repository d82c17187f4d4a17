"""hybrid_megatron.cuda_memory: runtime.setup() gives the CUDA allocator expandable segments
(and NCCL_GRAPH_REGISTER=0, which megatron-core's CUDA graphs then require) unless the
environment already configures the allocator."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.training_helpers import REPO

KEYS = ("PYTORCH_CUDA_ALLOC_CONF", "NCCL_GRAPH_REGISTER")


def _env_after_setup(env: dict) -> tuple[str, str]:
    code = (
        "import os; from hybrid_megatron import runtime; runtime.setup(); "
        f"print(*(os.environ.get(k, '-') for k in {KEYS!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return tuple(done.stdout.strip().splitlines()[-1].split())


def test_setup_sets_expandable_segments_unless_configured():
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    assert _env_after_setup(env) == ("expandable_segments:True", "0")
    assert _env_after_setup({**env, "NCCL_GRAPH_REGISTER": "1"}) == ("expandable_segments:True", "1")
    # an allocator configured by the user is left alone, and so is NCCL
    assert _env_after_setup({**env, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}) == (
        "max_split_size_mb:512",
        "-",
    )
