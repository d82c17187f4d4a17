"""torch.compile settings for the kernels megatron-core compiles (its fused SwiGLU on GPUs)."""

from __future__ import annotations

import os
import sys

COMPILE_THREADS_ENV = "TORCHINDUCTOR_COMPILE_THREADS"


def compile_in_process() -> None:
    """Make torch.compile (inductor) compile in the calling process, without a worker pool.

    megatron-core compiles its fused SwiGLU with torch.compile (``bias_activation_fusion``, on
    in the TE build). Inductor's default pool of compile-worker processes made our processes
    hang at exit on the H100 box (torch 2.11): ``shutdown_compile_workers`` waited on the pool
    for minutes after the last step, so a bench row or a trainer job never returned. With one
    compile thread inductor compiles in-process: a few seconds at the first step, nothing at exit.

    Takes nothing, returns nothing. Sets the environment default (read when inductor's config is
    first imported, also by child processes) and, if that config is already imported, its value;
    an explicit ``TORCHINDUCTOR_COMPILE_THREADS`` in the environment wins.
    """
    os.environ.setdefault(COMPILE_THREADS_ENV, "1")
    config = sys.modules.get("torch._inductor.config")
    if config is not None:
        setattr(config, "compile_threads", int(os.environ[COMPILE_THREADS_ENV]))  # a module: no stub
