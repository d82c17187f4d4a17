#!/usr/bin/env python3
"""Show statistics, a token histogram summary and decoded samples of an indexed dataset.

Example:
    python data_tools/inspect.py data/austen_4k_text_document --decode 0

All logic lives in hybrid_megatron.data.inspect_dataset; this file is a thin launcher.
"""

import sys

from _launch import run_main  # data_tools/_launch.py: the sys.path set-up shared by the tools

if __name__ == "__main__":
    sys.exit(run_main("hybrid_megatron.data.inspect_dataset"))
