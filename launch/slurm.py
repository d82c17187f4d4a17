#!/usr/bin/env python
"""Launch a training recipe on SLURM, on this machine, or print what would be launched.

    python launch/slurm.py RECIPE [key.path=value ...] [--local [--nproc N]] [--dry-run]
                                  [--wait] [--sweep]

The same as ``python -m hybrid_megatron.launch`` and ``hybrid-megatron-launch``; the launcher
lives in hybrid_megatron/launch/ (options and exit codes: hybrid_megatron/launch/cli.py).
"""

import sys

from hybrid_megatron.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
