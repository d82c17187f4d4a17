"""``python -m hybrid_megatron.training RECIPE [key=value ...]``: run one rank of a job.

For torchrun-style launches (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK in the
environment) or a single process; launch/slurm.py is the usual entry point.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    """Parse the arguments, set the process up, load the recipe and train.

    Returns the process exit code: 0 done, 2 bad input (recipe, data, tokenizer, checkpoint;
    one line on stderr).
    """
    parser = argparse.ArgumentParser(prog="python -m hybrid_megatron.training")
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)

    from hybrid_megatron import runtime

    runtime.setup()
    from hybrid_megatron.config import load_recipe
    from hybrid_megatron.errors import InputError
    from hybrid_megatron.training.entry import train

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        summary = train(recipe)
    except InputError as err:  # bad recipe, data, tokenizer or checkpoint: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary.get("mlflow_run_id") is not None:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
