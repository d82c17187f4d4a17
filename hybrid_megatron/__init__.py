"""hybrid_megatron: pretraining hybrid Transformer + Mamba2 language models on megatron-core.

Importing the package applies the CPU shims of :mod:`hybrid_megatron.compat` when CUDA is
absent, so every entry point (trainer, tests, converters) sees a megatron-core that runs on CPU,
and makes torch.compile compile in-process (:mod:`hybrid_megatron.torch_compile`).
"""

from hybrid_megatron.compat import apply_compat_shims
from hybrid_megatron.torch_compile import compile_in_process

apply_compat_shims()
compile_in_process()

__version__ = "0.1.0"
