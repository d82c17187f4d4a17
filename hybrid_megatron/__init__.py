"""hybrid_megatron: pretraining hybrid Transformer + Mamba2 language models on megatron-core.

Importing the package or any of its modules changes nothing global. Entry points call
:func:`hybrid_megatron.runtime.setup` first: it applies the CPU shims (no CUDA), the
torch.compile and CUDA-allocator defaults and the logging set-up.
"""

__version__ = "0.1.0"
