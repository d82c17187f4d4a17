"""``python -m hybrid_megatron.launch``: the launcher's command line (see `hybrid_megatron.launch.cli`)."""

import sys

from hybrid_megatron.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
