#!/usr/bin/env python3
"""Train a byte-level BPE tokenizer on local files (or import an existing local tokenizer).

Example:
    python data_tools/train_tokenizer.py --input data/austen.jsonl --vocab-size 4096 --output /tmp/tok

All logic lives in hybrid_megatron.data.tokenizer_training; this file is a thin launcher.
"""

import sys

from _launch import run_main  # data_tools/_launch.py: the sys.path set-up shared by the tools

if __name__ == "__main__":
    sys.exit(run_main("hybrid_megatron.data.tokenizer_training"))
