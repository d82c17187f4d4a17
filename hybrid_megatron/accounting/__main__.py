"""``python -m hybrid_megatron.accounting RECIPE_OR_MODEL_YAML [--seq-len L] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Print the accounting of a recipe's model as a table (or JSON with ``--json``).

    Takes command-line arguments; returns the exit status (2 for a bad file or config).
    The sequence length is ``--seq-len``, else the recipe's ``data.seq_length``, else the
    model's ``max_position_embeddings``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_megatron.accounting",
        description="Parameters, training FLOPs and inference cache of a model, per block type.",
    )
    parser.add_argument("config", help="recipe YAML (with a model: section) or model YAML")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence / context length")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="bytes per cached element")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    from hybrid_megatron import runtime
    from hybrid_megatron.errors import InputError

    runtime.setup()
    from hybrid_megatron.accounting.report import account, render_table, to_dict
    from hybrid_megatron.accounting.source import load_model_source

    try:
        source = load_model_source(args.config)
        cfg = source.model
        seq_len = args.seq_len or source.seq_len or cfg.max_position_embeddings
        report = account(cfg, seq_len, args.dtype_bytes)
    except (InputError, OSError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    if source.note:
        print(f"note: {args.config}: {source.note}", file=sys.stderr)
    if args.json:
        print(json.dumps(to_dict(report), indent=2))
    else:
        print(render_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
