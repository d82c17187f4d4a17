"""Looking inside an indexed dataset: stats, length and token histograms, decoded documents.

Reads through megatron-core's `IndexedDataset` (so what is shown is what training reads) and
decodes with the tokenizer recorded in PREFIX.stats.json unless another one is given.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_megatron import runtime
from hybrid_megatron.data.errors import DataToolsError
from hybrid_megatron.data.indexed_io import check_indexed_prefix
from hybrid_megatron.data.tokenizer import Tokenizer, load_tokenizer
from hybrid_megatron.errors import InputError


def read_stats(prefix: str) -> dict | None:
    """Returns PREFIX.stats.json as a dict, or None when there is none."""
    path = Path(prefix + ".stats.json")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataToolsError(f"{path}: unreadable stats file: {exc}") from exc


def length_summary(lengths: np.ndarray) -> dict:
    """Returns count/min/mean/percentiles/max of document lengths and a log2 histogram.

    The histogram maps "[lo, hi)" bucket labels (powers of two) to document counts.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return {"count": 0}
    summary: dict[str, Any] = {
        "count": int(lengths.size),
        "min": int(lengths.min()),
        "mean": round(float(lengths.mean()), 1),
        "p50": int(np.percentile(lengths, 50)),
        "p90": int(np.percentile(lengths, 90)),
        "p99": int(np.percentile(lengths, 99)),
        "max": int(lengths.max()),
    }
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    histogram: dict[str, int] = {}
    for bucket, count in zip(*np.unique(buckets, return_counts=True)):
        histogram[f"[{2 ** int(bucket)}, {2 ** (int(bucket) + 1)})"] = int(count)
    summary["histogram"] = histogram
    return summary


def token_summary(tokens: np.ndarray, tokenizer: Tokenizer | None, top: int) -> dict:
    """Returns how many distinct ids occur and the `top` most frequent ids with their text."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    order = np.argsort(-counts, kind="stable")[:top]
    total = max(int(counts.sum()), 1)
    return {
        "tokens_counted": int(counts.sum()),
        "distinct_ids": int(np.count_nonzero(counts)),
        "max_id": int(len(counts) - 1),
        "top": [
            {
                "id": int(i),
                "count": int(counts[i]),
                "share": round(int(counts[i]) / total, 4),
                "text": tokenizer.decode([int(i)]) if tokenizer else None,
            }
            for i in order
            if counts[i]
        ],
    }


def _recorded_tokenizer(prefix: str, recorded: str) -> str | None:
    """Finds the tokenizer named in the stats file: as recorded (relative to the directory the
    preprocessing ran in), else relative to the dataset's directory or its parent."""
    base = Path(prefix).parent
    for candidate in (Path(recorded), base / recorded, base.parent / recorded):
        if candidate.exists():
            return str(candidate)
    return None


def inspect_dataset(
    prefix: str, tokenizer_path: str | None = None, top: int = 20, max_tokens: int = 50_000_000
) -> dict:
    """Collects the report of a dataset prefix; returns it as a dict.

    Takes the prefix, an optional tokenizer (default: the one in PREFIX.stats.json, if it
    still exists), how many frequent tokens to list, and how many leading tokens to count for
    the token histogram (bounded so huge datasets stay quick).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    summary = check_indexed_prefix(prefix)
    stats = read_stats(prefix)
    tokenizer = None
    if tokenizer_path is None and stats:
        tokenizer_path = _recorded_tokenizer(prefix, stats["tokenizer"]["path"])
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
    dataset = IndexedDataset(prefix)
    tokens = np.memmap(prefix + ".bin", dtype=summary.dtype, mode="r")[:max_tokens]
    report = {
        "prefix": prefix,
        "documents": summary.documents,
        "sequences": summary.sequences,
        "tokens": summary.tokens,
        "dtype": summary.dtype.name,
        "document_lengths": length_summary(dataset.sequence_lengths),
        "token_histogram": token_summary(tokens, tokenizer, top),
        "tokenizer": str(tokenizer.path) if tokenizer else None,
        "stats_file": stats,
    }
    if tokenizer is not None and stats and stats["tokenizer"]["sha256"] != tokenizer.content_hash:
        report["warning"] = "the tokenizer differs from the one recorded in the stats file"
    return report


def decode_document(prefix: str, index: int, tokenizer: Tokenizer) -> str:
    """Returns document `index` of the dataset decoded to text (special tokens shown)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    if not 0 <= index < len(dataset):
        raise DataToolsError(f"dataset prefix {prefix}: document {index} out of range 0..{len(dataset) - 1}")
    return tokenizer.decode(dataset[index].tolist())


def _print_report(report: dict, out) -> None:
    p = functools.partial(print, file=out)
    p(f"dataset     {report['prefix']}")
    p(f"documents   {report['documents']:,}   tokens {report['tokens']:,}   dtype {report['dtype']}")
    stats = report["stats_file"]
    if stats:
        p(
            f"made from   {stats['text_bytes'] / 1e6:.2f} MB text in {len(stats['inputs'])} input(s); "
            f"append_eod={stats['append_eod']} skipped_lines={stats['skipped_lines']}"
        )
        tok = stats["tokenizer"]
        p(
            f"tokenizer   {tok['path']} ({tok['kind']}, vocab {tok['vocab_size']}, "
            f"sha256 {tok['sha256'][:16]}…)"
        )
    lengths = report["document_lengths"]
    if lengths["count"]:
        p(
            "doc length  "
            + "  ".join(f"{k} {lengths[k]:,}" for k in ("min", "mean", "p50", "p90", "p99", "max"))
        )
        widest = max(lengths["histogram"].values())
        for label, count in lengths["histogram"].items():
            p(f"  {label:>18} {count:>8,} {'#' * max(1, round(40 * count / widest))}")
    hist = report["token_histogram"]
    p(
        f"token ids   {hist['distinct_ids']:,} distinct, max id {hist['max_id']:,} "
        f"(over {hist['tokens_counted']:,} tokens)"
    )
    for row in hist["top"]:
        text = "" if row["text"] is None else f" {row['text']!r}"
        p(f"  id {row['id']:>7} {row['count']:>10,} {100 * row['share']:5.2f}%{text}")
    if "warning" in report:
        p(f"warning: {report['warning']}")


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of data_tools/inspect_dataset.py."""
    parser = argparse.ArgumentParser(
        prog="inspect_dataset.py", description="Inspect a megatron-core indexed dataset."
    )
    parser.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    parser.add_argument(
        "--decode", type=int, action="append", metavar="I", help="print document I decoded (repeatable)"
    )
    parser.add_argument("--samples", type=int, default=2, help="decoded previews of the first documents")
    parser.add_argument("--chars", type=int, default=300, help="characters per preview")
    parser.add_argument(
        "--tokenizer", help="tokenizer to decode with (default: the one in PREFIX.stats.json)"
    )
    parser.add_argument("--top", type=int, default=15, help="most frequent token ids to list")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 error)."""
    args = build_parser().parse_args(argv)
    runtime.setup()
    try:
        report = inspect_dataset(args.prefix, args.tokenizer, args.top)
        tokenizer = load_tokenizer(report["tokenizer"]) if report["tokenizer"] else None
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_report(report, sys.stdout)
        if tokenizer is None:
            if args.decode or args.samples:
                print("(no tokenizer found: pass --tokenizer to decode)")
            return 0
        for index in args.decode or []:
            print(f"\n=== document {index} ===")
            print(decode_document(args.prefix, index, tokenizer))
        if not args.decode and not args.json:
            for index in range(min(args.samples, report["documents"])):
                text = decode_document(args.prefix, index, tokenizer)
                more = "…" if len(text) > args.chars else ""
                print(f"\n--- document {index} (first {args.chars} chars) ---\n{text[: args.chars]}{more}")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
