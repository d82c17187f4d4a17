"""Input discovery and reading: jsonl (plain, .gz, .zst), parquet and plain text.

Readers do not parse JSON: they cut files into chunks of raw lines (about `chunk_bytes` each)
that the encode workers parse, so the parent process stays cheap and the work spreads over
the pool. Each chunk carries its file index and first line number so errors name file:line.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybrid_megatron.data.errors import DataToolsError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
TEXT_MODES = ("file", "paragraph", "line")


@dataclass(frozen=True)
class InputFile:
    """One input: its path, format ("jsonl", "parquet", "text") and compression (or None)."""

    path: Path
    format: str
    compression: str | None
    size: int


@dataclass
class Chunk:
    """A unit of work for an encode worker.

    kind "json": `items` are raw jsonl lines (bytes) starting at line `first_line`;
    kind "text": `items` are document strings (parquet rows or text pieces);
    kind "files": `items` are paths of files read by the worker, one document each
    (`file_index` is then the first file's index in the tree listing).
    `consumed` is how many on-disk bytes of the input this chunk advanced (for progress).
    `line_numbers` optionally gives each item's own line (text paragraphs skip blank lines).
    """

    file_index: int
    kind: str
    first_line: int
    items: list
    consumed: int = 0
    line_numbers: list[int] | None = field(default=None)


def detect_format(path: Path) -> tuple[str, str | None]:
    """Returns (format, compression) for a path from its suffixes; raises DataToolsError."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    base = suffixes[-2] if compression and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    if base in JSONL_SUFFIXES:
        return "jsonl", compression
    if base in TEXT_SUFFIXES:
        return "text", compression
    if base == ".parquet" and compression is None:
        return "parquet", None
    raise DataToolsError(
        f"{path}: unknown input format (want .jsonl/.json/.ndjson[.gz|.zst], .parquet or .txt/.md[.gz|.zst])"
    )


def expand_inputs(patterns: list[str]) -> list[InputFile]:
    """Expands files, directories and globs into InputFiles in a stable order.

    A glob's matches are sorted (so runs are reproducible); a directory contributes its files
    with known suffixes, sorted; an explicit file is taken as given. Raises DataToolsError for a
    pattern that matches nothing, an unreadable file or an unknown format.
    """
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataToolsError(f"{pattern}: glob matches no file")
            paths.extend(Path(m) for m in matches if not os.path.isdir(m))
        elif os.path.isdir(pattern):
            found = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and _known(p))
            if not found:
                raise DataToolsError(f"{pattern}: directory holds no input file of a known format")
            paths.extend(found)
        else:
            paths.append(Path(pattern))
    inputs = []
    for path in paths:
        if not path.exists():
            raise DataToolsError(f"{path}: input file does not exist")
        if not os.access(path, os.R_OK) or not path.is_file():
            raise DataToolsError(f"{path}: input file is not readable")
        fmt, compression = detect_format(path)
        inputs.append(InputFile(path, fmt, compression, path.stat().st_size))
    if not inputs:
        raise DataToolsError("no input files given")
    return inputs


def _known(path: Path) -> bool:
    try:
        detect_format(path)
        return True
    except DataToolsError:
        return False


class _CountingReader(io.RawIOBase):
    """Wraps a binary file to count the on-disk bytes read (progress for compressed input)."""

    def __init__(self, raw) -> None:
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.count += n or 0
        return n


def _open_binary(item: InputFile):
    """Opens an input for reading decompressed bytes; returns (stream, counter, closers)."""
    try:
        raw = open(item.path, "rb")
    except OSError as exc:
        raise DataToolsError(f"{item.path}: cannot open: {exc}") from exc
    counter = _CountingReader(raw)
    stream: Any
    if item.compression == "gzip":
        stream = gzip.GzipFile(fileobj=io.BufferedReader(counter, 1 << 20))
    elif item.compression == "zstd":
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(io.BufferedReader(counter, 1 << 20))
    else:
        stream = io.BufferedReader(counter, 1 << 20)
    return io.BufferedReader(stream, 1 << 20) if item.compression else stream, counter, raw


def _wrap_read_errors(item: InputFile, exc: Exception) -> DataToolsError:
    return DataToolsError(f"{item.path}: cannot read ({item.compression or 'uncompressed'}): {exc}")


def _iter_jsonl(index: int, item: InputFile, chunk_bytes: int) -> Iterator[Chunk]:
    stream, counter, raw = _open_binary(item)
    try:
        lines, size, first, number, reported = [], 0, 1, 0, 0
        try:
            for number, line in enumerate(stream, start=1):
                lines.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    yield Chunk(index, "json", first, lines, counter.count - reported)
                    reported = counter.count
                    lines, size, first = [], 0, number + 1
        except (OSError, EOFError, ValueError) as exc:
            raise _wrap_read_errors(item, exc) from exc
        except Exception as exc:  # zstandard.ZstdError does not derive from OSError
            if type(exc).__module__.startswith("zstandard"):
                raise _wrap_read_errors(item, exc) from exc
            raise
        if lines or counter.count > reported:
            yield Chunk(index, "json", first, lines, counter.count - reported)
    finally:
        raw.close()


def _iter_text(index: int, item: InputFile, chunk_bytes: int, mode: str) -> Iterator[Chunk]:
    stream, counter, raw = _open_binary(item)
    try:
        try:
            data = stream.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataToolsError(f"{item.path}: not UTF-8 text: {exc}") from exc
        except Exception as exc:
            raise _wrap_read_errors(item, exc) from exc
    finally:
        raw.close()
    if mode == "file":
        yield Chunk(index, "text", 1, [data] if data else [], item.size, [1])
        return
    # Split into (line number, text) pieces; paragraph mode keeps the paragraph's own newlines.
    pieces: list[tuple[int, str]] = []
    if mode == "line":
        pieces = [(n, line) for n, line in enumerate(data.splitlines(), start=1) if line.strip()]
    else:
        start_line, buffer = 0, []  # 0: no piece started (lines count from 1)
        for n, line in enumerate(data.splitlines(), start=1):
            if line.strip():
                start_line = start_line or n
                buffer.append(line)
            elif buffer:
                pieces.append((start_line, "\n".join(buffer)))
                start_line, buffer = 0, []
        if buffer:
            pieces.append((start_line, "\n".join(buffer)))
    batch, size = [], 0
    for line_no, text in pieces:
        batch.append((line_no, text))
        size += len(text)
        if size >= chunk_bytes:
            yield Chunk(index, "text", batch[0][0], [t for _, t in batch], 0, [n for n, _ in batch])
            batch, size = [], 0
    if batch:
        yield Chunk(index, "text", batch[0][0], [t for _, t in batch], 0, [n for n, _ in batch])
    # Progress for text files is reported once the whole file is cut.
    yield Chunk(index, "text", 0, [], item.size, [])


def _iter_parquet(index: int, item: InputFile, chunk_bytes: int, text_key: str) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(item.path)
    except Exception as exc:
        raise DataToolsError(f"{item.path}: not a readable parquet file: {exc}") from exc
    names = parquet.schema_arrow.names
    if text_key not in names:
        raise DataToolsError(f"{item.path}: parquet file has no column {text_key!r} (columns: {names})")
    total_rows = max(parquet.metadata.num_rows, 1)
    row = 1
    # Row numbers stand in for line numbers in messages (row 1 = first row).
    rows_per_batch = max(64, min(65536, int(chunk_bytes / max(item.size / total_rows, 1))))
    try:
        for batch in parquet.iter_batches(batch_size=rows_per_batch, columns=[text_key]):
            texts = batch.column(0).to_pylist()
            consumed = int(item.size * len(texts) / total_rows)
            yield Chunk(index, "text", row, texts, consumed, list(range(row, row + len(texts))))
            row += len(texts)
    except DataToolsError:
        raise
    except Exception as exc:
        raise DataToolsError(f"{item.path}: cannot read parquet data: {exc}") from exc


def iter_chunks(
    inputs: list[InputFile], *, text_key: str, chunk_bytes: int = 1 << 20, text_mode: str = "file"
) -> Iterator[Chunk]:
    """Yields the chunks of every input, in input order.

    Takes the expanded inputs, the JSON/parquet text field, a target chunk size in bytes and the
    plain-text mode ("file": one document per file, "paragraph": per blank-line separated
    block, "line": per non-empty line). Raises DataToolsError naming the file on read errors.
    """
    if text_mode not in TEXT_MODES:
        raise DataToolsError(f"unknown text mode {text_mode!r} (want one of {TEXT_MODES})")
    for index, item in enumerate(inputs):
        if item.format == "jsonl":
            yield from _iter_jsonl(index, item, chunk_bytes)
        elif item.format == "parquet":
            yield from _iter_parquet(index, item, chunk_bytes, text_key)
        else:
            yield from _iter_text(index, item, chunk_bytes, text_mode)


def parse_json_line(raw: bytes, key: str) -> tuple[str | None, str | None]:
    """Parses one jsonl line; returns (text, None) or (None, reason it is bad)."""
    try:
        record = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return None, f"malformed JSON: {exc}"
    if not isinstance(record, dict):
        return None, f"JSON line is a {type(record).__name__}, not an object"
    if key not in record:
        return None, f"missing text key {key!r} (keys: {sorted(record)[:10]})"
    if not isinstance(record[key], str):
        return None, f"text key {key!r} holds a {type(record[key]).__name__}, not a string"
    return record[key], None


def iter_texts(
    inputs: list[InputFile], *, text_key: str, text_mode: str = "file", skip_bad: bool = False
) -> Iterator[str]:
    """Yields every document text of the inputs in order (single process; for training).

    Bad lines raise DataToolsError naming file:line, or are skipped when `skip_bad` is set.
    """
    for chunk in iter_chunks(inputs, text_key=text_key, text_mode=text_mode):
        path = inputs[chunk.file_index].path
        if chunk.kind == "text":
            yield from (t for t in chunk.items if isinstance(t, str) and t)
            continue
        for offset, raw in enumerate(chunk.items):
            if not raw.strip():
                continue
            text, problem = parse_json_line(raw, text_key)
            if problem is not None:
                if skip_bad:
                    continue
                raise DataToolsError(f"{path}:{chunk.first_line + offset}: {problem}")
            if text:
                yield text
