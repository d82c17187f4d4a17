"""``setup()``: the process set-up every entry point runs before it builds anything.

Importing :mod:`hybrid_megatron` (or any of its modules) changes nothing global; what a
training, conversion or evaluation process needs is applied here, once, explicitly:

- the CPU shims of :mod:`hybrid_megatron.compat` when CUDA is absent, and the PyTorch SSD path
  when mamba-ssm's kernels are (megatron-core then runs on a CPU machine);
- torch.compile compiling in-process (:mod:`hybrid_megatron.torch_compile`);
- expandable segments for the CUDA allocator and ``NCCL_GRAPH_REGISTER=0``
  (:mod:`hybrid_megatron.cuda_memory`), unless the environment configures them;
- the package's log messages printed as plain lines on stdout (:mod:`hybrid_megatron.logs`);
- the known-harmless third-party warnings filtered out (:mod:`hybrid_megatron.known_warnings`),
  first, since some fire while megatron-core is imported.

Callers: the trainer's rank entry (``python -m hybrid_megatron.training`` and the launcher's
ranks), the launcher, every CLI (convert, evaluation, scaling, accounting, the data tools), the
benchmarks and the test suite (``tests/conftest.py`` and the ranks it spawns). Library code
never calls it; a program that uses the package as a library calls it first.
"""

from __future__ import annotations

_DONE = False


def setup() -> None:
    """Apply the CPU shims and the process defaults listed above; idempotent.

    Takes nothing, returns nothing. Call it before the first CUDA allocation and before
    torch.compile's config is read (the environment defaults are read then), and from the main
    thread (the CPU shims enter a torch function mode, which is per thread).
    """
    global _DONE
    if _DONE:
        return
    from hybrid_megatron.known_warnings import ignore_known_warnings

    ignore_known_warnings()
    from hybrid_megatron.compat import apply_compat_shims
    from hybrid_megatron.cuda_memory import expandable_segments_by_default
    from hybrid_megatron.logs import configure
    from hybrid_megatron.torch_compile import compile_in_process

    expandable_segments_by_default()
    compile_in_process()
    apply_compat_shims()
    configure()
    _DONE = True
