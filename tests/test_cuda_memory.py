"""hybrid_megatron.cuda_memory: importing the package gives the CUDA allocator expandable
segments unless the environment already configures the allocator."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.training_helpers import REPO


def _alloc_conf_after_import(env: dict) -> str:
    code = "import os, hybrid_megatron; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_import_sets_expandable_segments_unless_configured():
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    assert _alloc_conf_after_import(env) == "expandable_segments:True"
    env["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:512"
    assert _alloc_conf_after_import(env) == "max_split_size_mb:512"
