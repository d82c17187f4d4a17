#!/usr/bin/env python3
"""Train a byte-level BPE tokenizer on local files (or import an existing local tokenizer).

Example:
    python data_tools/train_tokenizer.py --input data/austen.jsonl --vocab-size 4096 --output /tmp/tok

The same as ``python -m hybrid_megatron.data.tokenizer_training`` and
``hybrid-megatron-train-tokenizer``.
"""

import sys

from hybrid_megatron.data.tokenizer_training import main

if __name__ == "__main__":
    sys.exit(main())
