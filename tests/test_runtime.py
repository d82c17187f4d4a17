"""Importing hybrid_megatron changes nothing global; runtime.setup() applies the process set-up.

Each check runs in a fresh interpreter: the test process itself was set up by conftest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.training_helpers import REPO

ENV_KEYS = ("PYTORCH_CUDA_ALLOC_CONF", "NCCL_GRAPH_REGISTER", "TORCHINDUCTOR_COMPILE_THREADS")

# Imports every module of the package, prints the global state, runs setup() twice, prints it again.
PROBE = f"""
import importlib, json, logging, os, pkgutil, sys, warnings
import torch
import hybrid_megatron
from hybrid_megatron.known_warnings import KNOWN_WARNINGS

failed = []
for module in pkgutil.walk_packages(hybrid_megatron.__path__, "hybrid_megatron."):
    try:
        importlib.import_module(module.name)
    except ImportError as err:  # an optional extra (lm_eval) that is not installed
        failed.append(err.name or module.name)

from megatron.core.ssm import mamba_mixer
from megatron.core.tensor_parallel import random as tp_random
from megatron.core.transformer import utils as transformer_utils
from megatron.core.transformer.moe import moe_utils


def state():
    return {{
        "env": {{k: os.environ.get(k) for k in {ENV_KEYS!r}}},
        "function_modes": torch._C._len_torch_function_stack(),
        "current_device": torch.cuda.current_device.__module__,
        "rng_tracker": tp_random.CudaRNGStatesTracker.__module__,
        "router_gating_linear": moe_utils.router_gating_linear.__module__,
        "causal_mask": transformer_utils.get_default_causal_mask.__module__,
        "causal_conv1d_fn": getattr(mamba_mixer.causal_conv1d_fn, "__module__", None),
        "inductor_threads": getattr(sys.modules.get("torch._inductor.config"), "compile_threads", None),
        "log_handlers": len(logging.getLogger("hybrid_megatron").handlers),
        "cuda": torch.cuda.is_available(),
        "known_warning_filters": sum(
            f[0] == "ignore" and f[1] is not None and f[1].pattern in {{k.message for k in KNOWN_WARNINGS}}
            for f in warnings.filters
        ),
        "known_warnings": len(KNOWN_WARNINGS),
    }}


before = state()
from hybrid_megatron import runtime

runtime.setup()
runtime.setup()
print(json.dumps({{"failed": failed, "before": before, "after": state()}}))
"""


def _probe(env: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probed():
    return _probe({k: v for k, v in os.environ.items() if k not in ENV_KEYS})


def test_importing_every_module_changes_nothing_global(probed):
    before = probed["before"]
    # Only optional third-party packages may be missing; every module of ours imported.
    assert not [
        name for name in probed["failed"] if name.split(".")[0] in ("hybrid_megatron", "torch", "megatron")
    ]
    assert before["env"] == dict.fromkeys(ENV_KEYS)
    assert before["function_modes"] == 0
    assert before["current_device"] == "torch.cuda"
    assert before["rng_tracker"] == "megatron.core.tensor_parallel.random"
    assert before["router_gating_linear"] == "megatron.core.transformer.moe.moe_utils"
    assert before["causal_mask"] == "megatron.core.transformer.utils"
    assert not (before["causal_conv1d_fn"] or "").startswith("hybrid_megatron")
    assert before["log_handlers"] == 0
    assert before["known_warning_filters"] == 0


def test_setup_applies_the_process_defaults(probed):
    after = probed["after"]
    assert after["env"] == {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "NCCL_GRAPH_REGISTER": "0",
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
    }
    assert after["inductor_threads"] in (None, 1)  # set if inductor's config was imported
    assert after["log_handlers"] == 1  # twice set up, one handler
    # each known-harmless warning filtered, once
    assert after["known_warning_filters"] == after["known_warnings"] > 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU shims apply without CUDA")
def test_setup_applies_the_cpu_shims_once(probed):
    after = probed["after"]
    assert after["function_modes"] == 1  # one CudaRequestsToCpu mode, not one per setup() call
    assert after["current_device"] == "hybrid_megatron.compat.cpu"
    assert after["rng_tracker"] == "hybrid_megatron.compat.cpu"
    assert after["router_gating_linear"] == "hybrid_megatron.compat.cpu"
    assert after["causal_mask"] == "hybrid_megatron.compat.cpu"
    assert after["causal_conv1d_fn"].startswith("hybrid_megatron.")  # the PyTorch SSD path


def test_the_errors_module_imports_nothing_heavy():
    code = (
        "import sys, hybrid_megatron.errors, hybrid_megatron.logs, hybrid_megatron.runtime; "
        "print(sorted(m for m in ('torch', 'megatron', 'numpy', 'pydantic') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"


def test_log_rank0_prints_plain_lines_on_rank_0_only_and_warnings_on_stderr():
    code = """
import os
from hybrid_megatron import logs

log = logs.get_logger("hybrid_megatron.training.entry")
log.info("before configure: dropped")
logs.configure()
logs.configure()
os.environ["RANK"] = "0"
logs.log_rank0(log, "step 1/2 loss 1.0000")
os.environ["RANK"] = "1"
logs.log_rank0(log, "from rank 1: dropped")
logs.get_logger("tests.other").info("any rank")  # under the package's logger
log.debug("below INFO: dropped")
log.warning("a warning, on stderr")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert (done.stdout, done.stderr) == ("step 1/2 loss 1.0000\nany rank\n", "a warning, on stderr\n")
