#!/usr/bin/env python3
"""Tokenize jsonl / jsonl.gz / jsonl.zst / parquet / text into a megatron-core indexed dataset.

Example:
    python data_tools/preprocess.py --input data/austen.jsonl --tokenizer data/tokenizer \
        --output-prefix /tmp/austen --workers 2 --append-eod

All logic lives in hybrid_megatron.data.preprocess; this file is a thin launcher.
"""

import os
import sys

# Running `python data_tools/<tool>.py` puts data_tools/ first on sys.path, where
# data_tools/inspect.py would shadow the stdlib `inspect` module (imported by dataclasses,
# torch, ...). Drop that entry before importing anything else, then make the repo importable.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import importlib.util  # noqa: E402  (must follow the sys.path fix)

if importlib.util.find_spec("hybrid_megatron") is None:
    sys.path.insert(0, os.path.dirname(_HERE))

from hybrid_megatron.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
