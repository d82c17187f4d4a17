#!/usr/bin/env python3
"""Show statistics, a token histogram summary and decoded samples of an indexed dataset.

Example:
    python data_tools/inspect_dataset.py data/austen_4k_text_document --decode 0

The same as ``python -m hybrid_megatron.data.inspect_dataset`` and ``hybrid-megatron-inspect``.
"""

import sys

from hybrid_megatron.data.inspect_dataset import main

if __name__ == "__main__":
    sys.exit(main())
