"""Corpus preprocessing: input files -> tokenized megatron-core indexed dataset (+ stats).

The parent process cuts inputs into ~1 MiB chunks of raw lines, a process pool parses and
tokenizes them (`encode_worker`), and the parent writes results strictly in input order, so
the output is byte-identical for any number of workers. At most a few chunks per worker are
in flight, which bounds memory and lets --max-docs stop reading early.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import signal
import sys
import time
from collections import deque
from collections.abc import Generator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from hybrid_megatron import runtime
from hybrid_megatron.data.encode_worker import ChunkResult, EncodeSettings, encode_chunk, init_worker, setup
from hybrid_megatron.data.errors import DataToolsError
from hybrid_megatron.data.indexed_io import AtomicIndexedWriter, token_dtype
from hybrid_megatron.data.readers import TEXT_MODES, Chunk, InputFile, expand_inputs, iter_chunks
from hybrid_megatron.data.tokenizer import Tokenizer, file_sha256, load_tokenizer
from hybrid_megatron.data.trees import (
    SourceCounts,
    TreeFile,
    TreeSelection,
    add_tree_arguments,
    files_digest,
    list_tree_files,
    tree_selection,
)
from hybrid_megatron.errors import InputError

# Reported skipped lines are listed up to this many; the rest are only counted.
MAX_LISTED_BAD = 20


@dataclass
class PreprocessOptions:
    """Everything one preprocessing run needs (mirrors the CLI flags of data_tools/preprocess.py).

    ``trees`` replaces ``inputs`` for a corpus of directory trees (see `preprocess_trees`);
    ``command`` is recorded in a tree corpus' manifest.
    """

    inputs: list[str]
    output_prefix: str
    tokenizer: str
    text_key: str = "text"
    workers: int = 1
    append_eod: bool = False
    prepend_bos: bool = False
    max_docs: int | None = None
    skip_bad: bool = False
    text_mode: str = "file"
    chunk_bytes: int = 1 << 20
    progress: bool = True
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    tiktoken_pattern: str = "cl100k"
    trees: TreeSelection | None = None
    command: str | None = None


@dataclass
class _Tally:
    documents: int = 0
    tokens: int = 0
    max_token_id: int = -1
    text_bytes: int = 0
    empty_docs: int = 0
    bad_count: int = 0
    bad_listed: list = field(default_factory=list)
    per_file_docs: dict = field(default_factory=dict)


def _results(
    chunks: Iterator, settings: EncodeSettings, workers: int
) -> Generator[tuple[int, ChunkResult], None, None]:
    """Yields (consumed input bytes, ChunkResult) per chunk, in input order.

    One worker runs in this process (no pickling at all); more use a pool with a bounded
    window of outstanding chunks. Closing the generator terminates the pool.
    """
    if workers <= 1:
        setup(settings)
        for chunk in chunks:
            yield chunk.consumed, encode_chunk(chunk)
        return
    # fork: workers inherit the imported modules instead of re-importing them (seconds each
    # with torch and megatron loaded); spawn where fork does not exist.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    # SIGTERM stays blocked while the workers fork, until each has reset the handler it inherits
    # (init_worker): a terminate() that reaches a worker still starting up then ends it quietly
    # instead of raising the parent's KeyboardInterrupt in it
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pool = mp.get_context(method).Pool(workers, initializer=init_worker, initargs=(settings,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        pending: deque = deque()
        window = 3 * workers
        for chunk in chunks:
            pending.append((chunk.consumed, pool.apply_async(encode_chunk, (chunk,))))
            while len(pending) >= window:
                consumed, future = pending.popleft()
                yield consumed, future.get()
        while pending:
            consumed, future = pending.popleft()
            yield consumed, future.get()
        pool.close()
        pool.join()
    finally:
        pool.terminate()


class _Progress:
    """tqdm bar over input bytes with docs/s and text MB/s in its postfix."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", disable=not enabled)
        self.start = self.last = time.monotonic()

    def update(self, consumed: int, tally: _Tally, force: bool = False) -> None:
        """Advances by `consumed` input bytes; refreshes rates at most twice a second."""
        self.bar.update(consumed)
        now = time.monotonic()
        if force or now - self.last >= 0.5:
            elapsed = max(now - self.start, 1e-9)
            self.bar.set_postfix_str(
                f"{tally.documents / elapsed:,.0f} docs/s, {tally.text_bytes / elapsed / 1e6:.2f} MB/s text",
                refresh=False,
            )
            self.last = now

    def close(self) -> None:
        """Closes the bar."""
        self.bar.close()


def _describe_inputs(inputs: list[InputFile], tally: _Tally) -> list[dict]:
    return [
        {
            "path": str(item.path),
            "format": item.format,
            "compression": item.compression,
            "bytes": item.size,
            "sha256": file_sha256(item.path),
            "documents": tally.per_file_docs.get(index, 0),
        }
        for index, item in enumerate(inputs)
    ]


def _check_options(options: PreprocessOptions) -> None:
    if options.workers < 1:
        raise DataToolsError(f"--workers must be >= 1, got {options.workers}")
    if options.max_docs is not None and options.max_docs < 1:
        raise DataToolsError(f"--max-docs must be >= 1, got {options.max_docs}")
    if options.text_mode not in TEXT_MODES:
        raise DataToolsError(f"unknown text mode {options.text_mode!r} (want one of {TEXT_MODES})")


def _encoding(options: PreprocessOptions) -> tuple[Tokenizer, EncodeSettings, np.dtype]:
    """The tokenizer, the workers' settings and the token dtype; raises DataToolsError when
    the tokenizer lacks a token the options ask for."""
    tokenizer = load_tokenizer(
        options.tokenizer,
        bos=options.bos,
        eos=options.eos,
        pad=options.pad,
        tiktoken_pattern=options.tiktoken_pattern,
    )
    if options.append_eod and tokenizer.eos_id is None:
        raise DataToolsError(
            f"{tokenizer.path}: --append-eod needs an eos token, and this tokenizer has none"
        )
    if options.prepend_bos and tokenizer.bos_id is None:
        raise DataToolsError(
            f"{tokenizer.path}: --prepend-bos needs a bos token, and this tokenizer has none"
        )
    dtype = token_dtype(tokenizer.vocab_size)
    settings = EncodeSettings(
        tokenizer_path=str(tokenizer.path),
        tokenizer_sha256=tokenizer.content_hash,
        text_key=options.text_key,
        append_eod=options.append_eod,
        prepend_bos=options.prepend_bos,
        skip_bad=options.skip_bad,
        dtype=dtype.name,
        bos=options.bos,
        eos=options.eos,
        pad=options.pad,
        tiktoken_pattern=options.tiktoken_pattern,
    )
    return tokenizer, settings, dtype


def preprocess(options: PreprocessOptions) -> dict:
    """Runs one preprocessing job; returns the stats dict also written to PREFIX.stats.json.

    Raises DataToolsError (naming file and line where there is one) for bad inputs, an
    unusable tokenizer or empty output; in every failure case no file is left under
    PREFIX.bin / PREFIX.idx / PREFIX.stats.json from this run.
    """
    _check_options(options)
    inputs = expand_inputs(options.inputs)
    tokenizer, settings, dtype = _encoding(options)
    tally = _Tally()
    progress = None
    try:
        with AtomicIndexedWriter(options.output_prefix, dtype) as writer:
            # Timing starts once megatron-core is imported (by the writer): that import is a
            # fixed cost of seconds that says nothing about throughput.
            started = time.monotonic()
            progress = _Progress(sum(item.size for item in inputs), options.progress)
            chunks = iter_chunks(
                inputs,
                text_key=options.text_key,
                chunk_bytes=options.chunk_bytes,
                text_mode=options.text_mode,
            )
            results = _results(chunks, settings, options.workers)
            try:
                for consumed, result in results:
                    if _absorb(result, inputs, tally, writer, options.max_docs):
                        break
                    progress.update(consumed, tally)
            finally:
                results.close()  # stops the pool now, also on errors and Ctrl-C
            progress.update(0, tally, force=True)
            if tally.documents == 0:
                detail = f" ({tally.bad_count} bad lines skipped)" if tally.bad_count else ""
                raise DataToolsError(
                    f"no documents found in {', '.join(str(i.path) for i in inputs)}{detail}"
                )
            stats = {
                "output_prefix": options.output_prefix,
                "documents": tally.documents,
                "tokens": tally.tokens,
                "max_token_id": tally.max_token_id,
                "text_bytes": tally.text_bytes,
                "empty_documents_dropped": tally.empty_docs,
                "skipped_lines": tally.bad_count,
                "skipped_examples": tally.bad_listed,
                "dtype": dtype.name,
                "append_eod": options.append_eod,
                "prepend_bos": options.prepend_bos,
                "text_key": options.text_key,
                "max_docs": options.max_docs,
                "tokenizer": tokenizer.describe(),
                "inputs": _describe_inputs(inputs, tally),
                "workers": options.workers,
                "elapsed_s": round(time.monotonic() - started, 3),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            writer.commit(stats)
    finally:
        if progress is not None:
            progress.close()
    return stats


def tree_outputs(prefix: str, valid_fraction: float) -> dict[str, str]:
    """The dataset prefix of each split of a tree corpus: PREFIX_train and PREFIX_valid when a
    share is held out, else PREFIX alone."""
    if valid_fraction > 0:
        return {"train": f"{prefix}_train", "valid": f"{prefix}_valid"}
    return {"train": prefix}


def _tree_chunks(files: list[TreeFile], selection: TreeSelection, chunk_bytes: int) -> Iterator[Chunk]:
    """Consecutive files of one split, about `chunk_bytes` per chunk, as paths for the workers."""
    batch: list[str] = []
    size = first = 0
    for index, item in enumerate(files):
        if batch and (size >= chunk_bytes or item.split != files[first].split):
            yield Chunk(first, "files", 0, batch, size)
            batch, size, first = [], 0, index
        batch.append(item.path(selection))
        size += item.size
    if batch:
        yield Chunk(first, "files", 0, batch, size)


def preprocess_trees(options: PreprocessOptions) -> dict:
    """Tokenizes a corpus of directory trees (``options.trees``); returns its manifest.

    One document per selected text file, exact duplicates dropped (the first in listing order
    is kept: training files before validation ones), the held-out files in PREFIX_valid (see
    `tree_outputs`). Writes the datasets, PREFIX.manifest.json (selection, tokenizer, per-source
    files, bytes and tokens, the digest of the file list, the command) and PREFIX.files.jsonl
    (one line per document: split, source, path, bytes, sha256, tokens). The output is the same
    for any number of workers. Raises DataToolsError for a bad selection or an empty split;
    then no output file of this run is left.
    """
    _check_options(options)
    selection = options.trees
    if selection is None:
        raise DataToolsError("preprocess_trees needs a tree selection")
    if options.max_docs is not None:
        raise DataToolsError(
            "--max-docs does not apply to --input-tree (narrow the selection with --include)"
        )
    files, sources = list_tree_files(selection)
    roots = ", ".join(selection.roots)
    if not files:
        raise DataToolsError(
            f"no file selected in {roots} (include {list(selection.include)}, exclude "
            f"{list(selection.exclude)}, at most {selection.max_file_bytes} bytes)"
        )
    tokenizer, settings, dtype = _encoding(options)
    prefixes = tree_outputs(options.output_prefix, selection.valid_fraction)
    tallies = {split: _Tally() for split in prefixes}
    lines: list[str] = []
    identities: list[str] = []
    seen: set[str] = set()
    with ExitStack() as stack:
        writers = {
            split: stack.enter_context(AtomicIndexedWriter(path, dtype)) for split, path in prefixes.items()
        }
        started = time.monotonic()
        progress = _Progress(sum(item.size for item in files), options.progress)
        stack.callback(progress.close)
        results = _results(_tree_chunks(files, selection, options.chunk_bytes), settings, options.workers)
        try:
            for consumed, result in results:
                _absorb_files(result, files, sources, seen, writers, tallies, lines, identities, selection)
                progress.update(consumed, tallies["train"])
        finally:
            results.close()
        for split, tally in tallies.items():
            if tally.documents == 0:
                raise DataToolsError(
                    f"the {split} split of {roots} holds no document "
                    f"({len(files)} files listed; see --include/--exclude/--valid-fraction)"
                )
        manifest = {
            "selection": selection.describe(),
            "outputs": prefixes,
            "documents": {split: t.documents for split, t in tallies.items()},
            "tokens": {split: t.tokens for split, t in tallies.items()},
            "text_bytes": {split: t.text_bytes for split, t in tallies.items()},
            "files_digest": files_digest(identities),
            "sources": [_describe_source(counts) for counts in sources],
            "tokenizer": tokenizer.describe(),
            "append_eod": options.append_eod,
            "prepend_bos": options.prepend_bos,
            "dtype": dtype.name,
            "workers": options.workers,
            "command": options.command,
            "elapsed_s": round(time.monotonic() - started, 3),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        prefix = options.output_prefix
        pending = [
            _write_pending(prefix + ".files.jsonl", "".join(line + "\n" for line in lines)),
            _write_pending(prefix + ".manifest.json", json.dumps(manifest, indent=2) + "\n"),
        ]
        stack.callback(_remove_pending, pending)
        for split, writer in writers.items():
            tally = tallies[split]
            writer.commit(
                {
                    "output_prefix": prefixes[split],
                    "split": split,
                    "documents": tally.documents,
                    "tokens": tally.tokens,
                    "text_bytes": tally.text_bytes,
                    "dtype": dtype.name,
                    "append_eod": options.append_eod,
                    "prepend_bos": options.prepend_bos,
                    "tokenizer": tokenizer.describe(),
                    "manifest": prefix + ".manifest.json",
                    "files_digest": manifest["files_digest"],
                    "created": manifest["created"],
                }
            )
        for tmp, final in pending:
            os.replace(tmp, final)
    return manifest


def _write_pending(path: str, text: str) -> tuple[str, str]:
    """Writes text under a temporary name beside `path`; returns (temporary, final) names."""
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    return tmp, path


def _remove_pending(pending: list[tuple[str, str]]) -> None:
    for tmp, _ in pending:
        if os.path.exists(tmp):
            os.remove(tmp)


def _describe_source(counts: SourceCounts) -> dict:
    return {
        "root": counts.root,
        "files_listed": counts.listed,
        "bytes_listed": counts.listed_bytes,
        "documents": counts.documents,
        "bytes": counts.bytes,
        "tokens": counts.tokens,
        "skipped": {
            "duplicate": counts.duplicates,
            "binary": counts.binary,
            "unreadable": counts.unreadable,
            "empty": counts.empty,
            "over_size_cap": counts.too_large,
            "symlink": counts.links,
        },
    }


def _absorb_files(
    result: ChunkResult,
    files: list[TreeFile],
    sources: list[SourceCounts],
    seen: set[str],
    writers: dict,
    tallies: dict[str, _Tally],
    lines: list[str],
    identities: list[str],
    selection: TreeSelection,
) -> None:
    """Writes a chunk's files that are new content to their split; counts the rest per source."""
    first = result.file_index
    for index, reason in result.skipped:
        counts = sources[files[first + index].source]
        if reason == "binary":
            counts.binary += 1
        elif reason == "empty":
            counts.empty += 1
        else:
            counts.unreadable += 1
    ends = np.cumsum(result.lengths)
    parts, lengths = [], []
    split = files[first].split
    tally = tallies[split]
    for doc, (index, digest) in enumerate(zip(result.doc_items, result.doc_hashes)):
        item = files[first + index]
        counts = sources[item.source]
        if digest in seen:
            counts.duplicates += 1
            continue
        seen.add(digest)
        length = int(result.lengths[doc])
        parts.append(result.tokens[ends[doc] - length : ends[doc]])
        lengths.append(length)
        counts.documents[split] += 1
        counts.bytes[split] += item.size
        counts.tokens[split] += length
        tally.documents += 1
        tally.tokens += length
        tally.text_bytes += item.size
        root = selection.roots[item.source]
        identities.append(json.dumps([split, root, item.relpath, digest]))
        lines.append(
            json.dumps(
                {
                    "split": split,
                    "source": root,
                    "path": item.relpath,
                    "bytes": item.size,
                    "sha256": digest,
                    "tokens": length,
                }
            )
        )
    if lengths:
        writers[split].add_documents(np.concatenate(parts), np.asarray(lengths, np.int64))


def _absorb(result: ChunkResult, inputs: list[InputFile], tally: _Tally, writer, max_docs) -> bool:
    """Writes one chunk's documents and updates counts; returns True once max_docs is reached."""
    path = inputs[result.file_index].path
    if result.error is not None:
        line, message = result.error
        raise DataToolsError(f"{path}:{line}: {message} (use --skip-bad to skip such lines)")
    for line, message in result.bad:
        tally.bad_count += 1
        if len(tally.bad_listed) < MAX_LISTED_BAD:
            tally.bad_listed.append(f"{path}:{line}: {message}")
    tokens, lengths = result.tokens, result.lengths
    done = False
    if max_docs is not None and tally.documents + len(lengths) >= max_docs:
        keep = max_docs - tally.documents
        lengths = lengths[:keep]
        tokens = tokens[: int(lengths.sum())]
        # text_bytes of a truncated chunk is not known per document: recount from the share.
        result.text_bytes = int(result.text_bytes * keep / max(len(result.lengths), 1))
        done = True
    writer.add_documents(tokens, lengths)
    if len(tokens):
        tally.max_token_id = max(tally.max_token_id, int(tokens.max()))
    tally.documents += len(lengths)
    tally.tokens += int(lengths.sum())
    tally.text_bytes += result.text_bytes
    tally.empty_docs += result.empty_docs
    tally.per_file_docs[result.file_index] = tally.per_file_docs.get(result.file_index, 0) + len(lengths)
    return done


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of data_tools/preprocess.py."""
    parser = argparse.ArgumentParser(
        prog="preprocess.py",
        description="Tokenize jsonl(.gz/.zst) / parquet / text files into a megatron-core indexed dataset.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        metavar="FILE_OR_GLOB",
        help="input files, directories or globs (quote globs), read in the given order",
    )
    add_tree_arguments(parser, source)
    parser.add_argument("--text-key", default="text", help="JSON field / parquet column holding the text")
    parser.add_argument(
        "--tokenizer", required=True, help="tokenizer.json, HF dir, sentencepiece .model or tiktoken file"
    )
    parser.add_argument(
        "--output-prefix",
        required=True,
        help="writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json (--input-tree: also PREFIX.manifest.json "
        "and PREFIX.files.jsonl; with --valid-fraction the datasets are PREFIX_train and PREFIX_valid)",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--append-eod", action="store_true", help="append the eos token to every document")
    parser.add_argument("--prepend-bos", action="store_true", help="prepend the bos token to every document")
    parser.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip (count and report) malformed lines instead of failing"
    )
    parser.add_argument(
        "--text-mode",
        choices=TEXT_MODES,
        default="file",
        help="plain-text inputs: one document per file, paragraph or line",
    )
    parser.add_argument("--chunk-mb", type=float, default=1.0, help="work unit size sent to a worker")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--bos", help="bos token string (overrides the tokenizer's config)")
    parser.add_argument("--eos", help="eos token string (overrides the tokenizer's config)")
    parser.add_argument("--pad", help="pad token string (overrides the tokenizer's config)")
    parser.add_argument(
        "--tiktoken-pattern", default="cl100k", help="pre-tokenizer regex name for tiktoken files"
    )
    return parser


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 data error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    runtime.setup()
    trees = tree_selection(args)
    # SIGTERM (e.g. a scheduler's time limit) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    options = PreprocessOptions(
        inputs=args.input or [],
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        text_key=args.text_key,
        workers=args.workers,
        append_eod=args.append_eod,
        prepend_bos=args.prepend_bos,
        max_docs=args.max_docs,
        skip_bad=args.skip_bad,
        text_mode=args.text_mode,
        chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))),
        progress=not args.no_progress,
        bos=args.bos,
        eos=args.eos,
        pad=args.pad,
        tiktoken_pattern=args.tiktoken_pattern,
        trees=trees,
        command=shlex.join(["data_tools/preprocess.py", *(sys.argv[1:] if argv is None else argv)]),
    )
    try:
        if trees is not None:
            return _report_trees(preprocess_trees(options))
        stats = preprocess(options)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    rate = stats["text_bytes"] / max(stats["elapsed_s"], 1e-9) / 1e6
    print(
        f"wrote {options.output_prefix}.bin/.idx: {stats['documents']:,} documents, "
        f"{stats['tokens']:,} tokens from {stats['text_bytes'] / 1e6:.1f} MB of text "
        f"in {stats['elapsed_s']:.1f}s ({rate:.2f} MB/s)"
        + (f"; skipped {stats['skipped_lines']} bad lines" if stats["skipped_lines"] else "")
    )
    for example in stats["skipped_examples"]:
        print(f"  skipped {example}")
    return 0


def _report_trees(manifest: dict) -> int:
    """Prints what a tree corpus holds, per split and per source; returns 0."""
    for split, prefix in manifest["outputs"].items():
        print(
            f"wrote {prefix}.bin/.idx: {manifest['documents'][split]:,} documents, "
            f"{manifest['tokens'][split]:,} tokens from {manifest['text_bytes'][split] / 1e6:.1f} MB"
        )
    for source in manifest["sources"]:
        skipped = ", ".join(f"{n:,} {why}" for why, n in source["skipped"].items() if n)
        print(
            f"  {source['root']}: {sum(source['documents'].values()):,} files, "
            f"{sum(source['bytes'].values()) / 1e6:.1f} MB, {sum(source['tokens'].values()):,} tokens"
            + (f" (skipped {skipped})" if skipped else "")
        )
    print(f"files digest {manifest['files_digest']} in {manifest['elapsed_s']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
