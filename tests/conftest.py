"""The test process's set-up (``runtime.setup``, as every entry point does) and shared
fixtures: a one-rank gloo process group with megatron-core's parallel state and a single-node
SLURM cluster on 127.0.0.1."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    """Set the test process up like an entry point, before any test module is imported.

    Ranks that tests start get the same from their own entry: tests/distributed.py's rank
    entry, the launcher's TrainJob, the CLIs' ``main``. pytest puts its own warning filters
    back around each test, so the known-harmless warnings that setup() filters are also given
    to pytest as ``filterwarnings`` lines.
    """
    from hybrid_megatron import runtime
    from hybrid_megatron.known_warnings import pytest_filter_lines

    runtime.setup()
    for line in pytest_filter_lines():
        config.addinivalue_line("filterwarnings", line)


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests when CUDA is absent."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def single_rank():
    """A 1-rank process group (gloo on CPU, nccl on GPU) with TP=PP=EP=1; idempotent.

    Yields nothing; tests build models with ``hybrid_megatron.models.build_model``. Each test
    that needs fresh RNG streams calls ``setup_model_parallel`` itself.
    """
    import torch
    import torch.distributed as dist

    from hybrid_megatron.config.parallel import ParallelConfig
    from hybrid_megatron.training.parallel_setup import setup_model_parallel
    from tests.distributed import free_port

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
        )
    setup_model_parallel(ParallelConfig(), seed=1)
    yield


def build_single(cfg_dict: dict, seed: int = 1):
    """Build a model from a recipe-style dict at TP=PP=1 with fresh RNG streams (seeded)."""
    from hybrid_megatron.config.model import ModelConfig
    from hybrid_megatron.config.parallel import ParallelConfig
    from hybrid_megatron.models import build_model
    from hybrid_megatron.training.parallel_setup import setup_model_parallel

    setup_model_parallel(ParallelConfig(), seed=seed)
    return build_model(ModelConfig(**cfg_dict))


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A single-node SLURM cluster on 127.0.0.1 for a module's SLURM tests (skipped without one)."""
    from tests.slurm_cluster import SlurmCluster, SlurmClusterError, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmClusterError as err:
        pytest.skip(f"the test SLURM cluster did not start: {err}")
    yield cluster
    cluster.stop()
