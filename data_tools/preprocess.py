#!/usr/bin/env python3
"""Tokenize jsonl / jsonl.gz / jsonl.zst / parquet / text into a megatron-core indexed dataset.

Example:
    python data_tools/preprocess.py --input data/austen.jsonl --tokenizer data/tokenizer \
        --output-prefix /tmp/austen --workers 2 --append-eod

All logic lives in hybrid_megatron.data.preprocess; this file is a thin launcher.
"""

import sys

from _launch import run_main  # data_tools/_launch.py: the sys.path set-up shared by the tools

if __name__ == "__main__":
    sys.exit(run_main("hybrid_megatron.data.preprocess"))
