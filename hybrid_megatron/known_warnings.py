"""Third-party warnings that say nothing about the run: each named by its category, message and
the module that issues it, so a new or unexpected warning still prints.

:func:`ignore_known_warnings` (called by ``hybrid_megatron.runtime.setup``) installs the filters
in a process; :func:`pytest_filter_lines` gives the same filters in pytest's ``filterwarnings``
form (tests/conftest.py adds them, since pytest resets the process's filters around each test).
Imports nothing heavy: entries name their categories by builtin class.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    """One harmless warning: ``message`` and ``module`` are regular expressions matched at the
    start of the warning's text and of the module it is attributed to (as ``warnings`` does)."""

    category: type[Warning]
    message: str
    module: str
    why: str


KNOWN_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(
        UserWarning,
        r"Transformer Engine and Apex are not installed\. Falling back to",
        r"megatron\.core\.",
        "the CPU build has neither; on GPUs Transformer Engine is installed and this does not fire",
    ),
    KnownWarning(
        UserWarning,
        r"Apex is not installed\. Falling back to Torch Norm",
        r"megatron\.core\.",
        "the project never uses apex; its norms come from Transformer Engine or torch",
    ),
    KnownWarning(
        DeprecationWarning,
        r"The 'megatron\.core\.transformer\.custom_layers\.transformer_engine'",
        r"megatron\.core\.",
        "megatron-core imports its own deprecated module",
    ),
    KnownWarning(
        DeprecationWarning,
        r"The following imports from `dynamic_context\.py` will be removed",
        r"megatron\.core\.inference\.",
        "megatron-core imports its own deprecated names",
    ),
    KnownWarning(
        DeprecationWarning,
        r"`torch\.jit\.script_method` is deprecated",
        r"torch\.jit\.",
        "torch's own mkldnn module uses it, imported by torch.compile's inductor",
    ),
    KnownWarning(
        DeprecationWarning,
        r"Warning. tp_group is None, using default tp group",  # "." for the ":" pytest splits at
        r"megatron\.core\.",
        "megatron-core's RowParallelLinear and checkpoint helpers pass no group themselves",
    ),
    KnownWarning(
        DeprecationWarning,
        r"MLP requires ffn_hidden_size, but it was not provided",
        r"megatron\.core\.transformer\.moe\.shared_experts",
        "megatron-core's shared expert builds its MLP without the size (our specs pass it)",
    ),
    KnownWarning(
        FutureWarning,
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        r"torch\.distributed\.c10d_logger",
        "megatron-core's gradient buffers and optimizer call the older collectives",
    ),
    KnownWarning(
        FutureWarning,
        r"`load_state_dict` is deprecated and will be removed in future versions",
        r"megatron\.core\.dist_checkpointing\.",
        "megatron-core's torch_dist loader calls torch's older entry",
    ),
    KnownWarning(
        FutureWarning,
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        # torch's sharded-tensor code, reached from megatron-core's torch_dist loader; on CPU the
        # warning is attributed to the CUDA-to-CPU function mode that forwards the call.
        r"(torch\.distributed\.|hybrid_megatron\.compat\.cpu)",
        "megatron-core's checkpoint format still builds torch ShardedTensors",
    ),
    KnownWarning(
        UserWarning,
        r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
        # megatron-core's DistributedOptimizer.zero_grad reads .grad of its shard views; on CPU
        # the warning is attributed to the CUDA-to-CPU function mode that forwards the call.
        r"(megatron\.core\.optimizer\.|hybrid_megatron\.compat\.cpu)",
        "megatron-core's distributed optimizer checks .grad of its main-parameter shard views",
    ),
    KnownWarning(
        DeprecationWarning,
        r"The ``noload`` loader strategy is deprecated",
        r"mlflow\.",
        "MLflow's SQL store uses an SQLAlchemy option it has yet to replace",
    ),
)


def ignore_known_warnings() -> None:
    """Install an ``ignore`` filter for each entry of :data:`KNOWN_WARNINGS`; idempotent (the
    ``warnings`` module drops a filter already in its list). Takes and returns nothing."""
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=known.message, category=known.category, module=known.module)


def pytest_filter_lines() -> list[str]:
    """The entries as pytest ``filterwarnings`` lines (``ignore:message:category:module``)."""
    lines = []
    for known in KNOWN_WARNINGS:
        if ":" in known.message or ":" in known.module:  # pytest splits its lines at colons
            raise ValueError(f"known warning {known.message!r}: a colon cannot go into a pytest filter")
        lines.append(f"ignore:{known.message}:{known.category.__name__}:{known.module}")
    return lines
