"""hybrid_megatron: pretraining hybrid Transformer + Mamba2 language models on megatron-core.

Importing the package applies the CPU shims of :mod:`hybrid_megatron.compat` when CUDA is
absent, so every entry point (trainer, tests, converters) sees a megatron-core that runs on CPU,
makes torch.compile compile in-process (:mod:`hybrid_megatron.torch_compile`) and gives the CUDA
allocator expandable segments (:mod:`hybrid_megatron.cuda_memory`).
"""

from hybrid_megatron.compat import apply_compat_shims
from hybrid_megatron.cuda_memory import expandable_segments_by_default
from hybrid_megatron.torch_compile import compile_in_process

apply_compat_shims()
compile_in_process()
expandable_segments_by_default()

__version__ = "0.1.0"
