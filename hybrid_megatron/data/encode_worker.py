"""Worker side of preprocessing: parse one chunk, tokenize it, return flat numpy arrays.

Runs in pool processes (or in the parent when --workers 1), so it imports only json, numpy
and the tokenizer. Results are one token array plus per-document lengths: cheap to pickle,
unlike a list of Python lists.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import numpy as np

from hybrid_megatron.data.readers import Chunk, parse_json_line
from hybrid_megatron.data.trees import read_text_file


@dataclass(frozen=True)
class EncodeSettings:
    """What a worker needs to rebuild the tokenizer and treat documents.

    tokenizer_path / bos / eos / pad / tiktoken_pattern: passed to `load_tokenizer`;
    tokenizer_sha256: the file's hash, so a process reloads when the file changed;
    text_key: the JSON field; append_eod / prepend_bos: add eos after / bos before each
    document; skip_bad: count bad lines instead of failing; dtype: numpy dtype name of tokens.
    """

    tokenizer_path: str
    tokenizer_sha256: str = ""  # part of the key: a rewritten file at the same path reloads
    text_key: str = "text"
    append_eod: bool = False
    prepend_bos: bool = False
    skip_bad: bool = False
    dtype: str = "uint16"
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    tiktoken_pattern: str = "cl100k"


@dataclass
class ChunkResult:
    """Tokens of one chunk: `tokens` (flat), `lengths` (per document), counts and problems.

    `bad` lists (line, reason) of skipped lines; `error` is (line, message) of the first fatal
    problem when skip_bad is off (the parent turns it into a DataToolsError naming file:line).
    For a chunk of files (kind "files"): `doc_items` gives each document's item index in the
    chunk and `doc_hashes` the sha256 of its bytes; `skipped` lists (item index, reason) of the
    files that are not documents (binary, unreadable).
    """

    file_index: int
    tokens: np.ndarray
    lengths: np.ndarray
    text_bytes: int = 0
    empty_docs: int = 0
    bad: list = field(default_factory=list)
    error: tuple | None = None
    doc_items: list = field(default_factory=list)
    doc_hashes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


_STATE: dict = {}


def init_worker(settings: EncodeSettings) -> None:
    """Pool initializer: loads the tokenizer once per process; leaves signals to the parent.

    The parent alone handles Ctrl-C (it terminates the pool and removes temporary files);
    workers ignoring it avoids a traceback per process.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the parent's SIGTERM-as-Ctrl-C handler; the pool's terminate()
    # uses SIGTERM, which must simply end the worker.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked by the parent while forking
    setup(settings)


def setup(settings: EncodeSettings) -> None:
    """Loads the tokenizer for `settings` into this process (idempotent)."""
    # One core per worker: the pipeline parallelises with processes, so the Rust thread pool
    # would only oversubscribe the cores (and skew the 1-vs-N-worker benchmark).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _STATE.get("settings") != settings:
        from hybrid_megatron.data.tokenizer import load_tokenizer

        _STATE["tokenizer"] = load_tokenizer(
            settings.tokenizer_path,
            bos=settings.bos,
            eos=settings.eos,
            pad=settings.pad,
            tiktoken_pattern=settings.tiktoken_pattern,
        )
        _STATE["settings"] = settings


def _parse_json_lines(chunk: Chunk, settings: EncodeSettings, result: ChunkResult) -> list[str]:
    """Extracts the text field of each line; records bad lines or the first error."""
    texts = []
    key = settings.text_key
    for offset, raw in enumerate(chunk.items):
        if not raw.strip():
            continue  # blank lines (e.g. a trailing newline) are not documents
        line = chunk.first_line + offset
        text, problem = parse_json_line(raw, key)
        if problem is None:
            assert text is not None  # parse_json_line gives a text or a problem
            texts.append(text)
            continue
        if not settings.skip_bad:
            result.error = (line, problem)
            return texts
        result.bad.append((line, problem))
    return texts


def _read_files(chunk: Chunk, result: ChunkResult) -> list[str]:
    """Reads a chunk of file paths: one document per text file; binary ones are skipped."""
    texts = []
    for index, path in enumerate(chunk.items):
        text, problem, digest = read_text_file(path)
        if problem is not None or not text:
            result.skipped.append((index, problem or "empty"))
            continue
        texts.append(text)
        result.doc_items.append(index)
        result.doc_hashes.append(digest)
    return texts


def encode_chunk(chunk: Chunk) -> ChunkResult:
    """Tokenizes one chunk with the process's tokenizer; returns a ChunkResult.

    Empty documents are dropped (counted in `empty_docs`): with no tokens they would only add
    zero-length entries to the index.
    """
    settings: EncodeSettings = _STATE["settings"]
    tokenizer = _STATE["tokenizer"]
    result = ChunkResult(chunk.file_index, np.empty(0, settings.dtype), np.empty(0, np.int64))
    if chunk.kind == "json":
        texts = _parse_json_lines(chunk, settings, result)
    elif chunk.kind == "files":
        texts = _read_files(chunk, result)
    else:
        texts = []
        for offset, text in enumerate(chunk.items):
            if not isinstance(text, str):
                line = chunk.line_numbers[offset] if chunk.line_numbers else chunk.first_line + offset
                problem = f"text is {type(text).__name__}, not a string"
                if not settings.skip_bad:
                    result.error = (line, problem)
                    break
                result.bad.append((line, problem))
                continue
            texts.append(text)
    if result.error is not None:
        return result
    kept = [t for t in texts if t]
    result.empty_docs = len(texts) - len(kept)
    if not kept:
        return result
    tokens, lengths = tokenizer.encode_batch_flat(kept)
    if settings.append_eod:
        # eos after each document: insert at each document's end offset.
        tokens = np.insert(tokens, np.cumsum(lengths), tokenizer.eos_id)
        lengths = lengths + 1
    if settings.prepend_bos:
        tokens = np.insert(tokens, np.cumsum(lengths) - lengths, tokenizer.bos_id)
        lengths = lengths + 1
    result.tokens = tokens.astype(settings.dtype)
    result.lengths = lengths
    result.text_bytes = sum(len(t.encode("utf-8")) for t in kept)
    return result
