"""hybrid_megatron: pretraining hybrid Transformer + Mamba2 language models on megatron-core.

Importing the package applies the CPU shims of :mod:`hybrid_megatron.compat` when CUDA is
absent, so every entry point (trainer, tests, converters) sees a megatron-core that runs on CPU.
"""

from hybrid_megatron.compat import apply_compat_shims

apply_compat_shims()

__version__ = "0.1.0"
