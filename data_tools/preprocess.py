#!/usr/bin/env python3
"""Tokenize jsonl / jsonl.gz / jsonl.zst / parquet / text into a megatron-core indexed dataset.

Example:
    python data_tools/preprocess.py --input data/austen.jsonl --tokenizer data/tokenizer \
        --output-prefix /tmp/austen --workers 2 --append-eod

The same as ``python -m hybrid_megatron.data.preprocess`` and ``hybrid-megatron-preprocess``.
"""

import sys

from hybrid_megatron.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
