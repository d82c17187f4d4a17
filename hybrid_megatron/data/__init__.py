"""Data side of hybrid_megatron: tokenizers, corpus preprocessing and dataset blends.

Modules (each with one job):
  tokenizer           the one Tokenizer abstraction (`load_tokenizer`)
  tokenizer_training  byte-level BPE training / import of existing tokenizers
  readers             input discovery and reading (jsonl[.gz|.zst], parquet, text)
  encode_worker       per-process parsing + tokenization of one chunk
  indexed_io          atomic megatron-core indexed dataset writing, prefix checks
  preprocess          the preprocessing pipeline and its CLI
  inspect_dataset     dataset statistics and decoded samples
  datasets            DataConfig -> train/valid/test GPTDatasets (BlendedMegatronDatasetBuilder)

Nothing here imports megatron-core at import time (it takes seconds); the modules that need
it import it inside the functions that use it.
"""

from hybrid_megatron.data.errors import DataToolsError
from hybrid_megatron.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["DataToolsError", "Tokenizer", "load_tokenizer"]
