"""``python -m hybrid_megatron.tracking sync RUN_DIR [--tracking-uri URI]``: send what a run's
tracking spool (``RUN_DIR/mlflow_spool/``) still holds, in order, each record once.

Exit codes: 0 all sent (or nothing to send), 1 the store did not answer (the rest stays
spooled; run it again), 2 no spool in RUN_DIR.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and sync; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m hybrid_megatron.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="send a run's spooled MLflow records")
    sync.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (parent of checkpoint.dir)")
    sync.add_argument(
        "--tracking-uri", default=None, help="send to this store instead of the one the run used"
    )
    args = parser.parse_args(argv)

    from hybrid_megatron.errors import InputError
    from hybrid_megatron.logs import configure
    from hybrid_megatron.tracking.spool import Spool
    from hybrid_megatron.tracking.store import failure_reason, short_requests

    configure()  # the log set-up of runtime.setup; a sync builds nothing, so no torch
    try:
        spool = Spool(args.run_dir)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.tracking_uri:
        spool.uri = args.tracking_uri
    left = len(spool.unsent())
    if not left:
        print(f"{args.run_dir}: nothing to send (MLflow run {spool.run_id} at {spool.uri})")
        return 0
    try:
        with short_requests():
            sent = spool.send()
    except Exception as err:  # the store's errors are many types; the message says which
        print(
            f"error: {spool.uri} did not take the records ({failure_reason(err)}); "
            f"{len(spool.unsent())} of {left} still kept in {spool.dir}",
            file=sys.stderr,
        )
        return 1
    print(f"sent {sent} records to MLflow run {spool.run_id} at {spool.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
