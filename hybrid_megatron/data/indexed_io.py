"""Writing megatron-core indexed datasets atomically, and checking existing ones.

Writing goes through megatron-core's `IndexedDatasetBuilder` into temporary files that are
renamed to PREFIX.bin / PREFIX.idx only after the index is complete; an error, Ctrl-C or
SIGTERM removes them, and even a SIGKILL leaves nothing under the final names (the .idx,
renamed last, marks a complete dataset).

Checking reads the .idx header and arrays with numpy (no megatron import) and verifies the
.bin size against them, so a truncated or foreign file is reported with its prefix.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_megatron.data.errors import DataToolsError

_MAGIC = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes (part of the .idx file format).
_DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


def token_dtype(vocab_size: int) -> np.dtype:
    """Returns the narrowest token dtype for a vocabulary: uint16 below 65500 ids, else int32.

    Same threshold as megatron-core's DType.optimal_dtype, so GPTDataset reads it natively.
    """
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


@dataclass(frozen=True)
class IndexSummary:
    """What an .idx says: sequence and document counts, token dtype and total tokens."""

    prefix: str
    sequences: int
    documents: int
    dtype: np.dtype
    tokens: int


def check_indexed_prefix(prefix: str | os.PathLike) -> IndexSummary:
    """Verifies that PREFIX.bin and PREFIX.idx exist and agree; returns an IndexSummary.

    Raises DataToolsError naming the prefix if a file is missing, the .idx is not a
    megatron-core index, or the .bin size does not match the token count in the index.
    """
    prefix = str(prefix)
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DataToolsError(f"dataset prefix {prefix}: {path} does not exist")
    try:
        with open(idx_path, "rb") as handle:
            header = handle.read(len(_MAGIC) + 8 + 1 + 8 + 8)
        if len(header) < len(_MAGIC) + 25 or header[: len(_MAGIC)] != _MAGIC:
            raise ValueError("not a megatron-core .idx file (bad magic)")
        version, code, sequences, documents = struct.unpack_from("<QBQQ", header, len(_MAGIC))
        if version != 1 or code not in _DTYPE_CODES:
            raise ValueError(f"unsupported version {version} or dtype code {code}")
        expected = len(header) + sequences * (4 + 8) + documents * 8
        actual = idx_path.stat().st_size
        if actual not in (expected, expected + sequences):  # + sequence modes when multimodal
            raise ValueError(f"size {actual} bytes, expected {expected} for {sequences} sequences")
        lengths = np.memmap(idx_path, np.int32, "r", offset=len(header), shape=(sequences,))
        tokens = int(lengths.sum(dtype=np.int64)) if sequences else 0
        del lengths
    except (OSError, ValueError, struct.error) as exc:
        raise DataToolsError(f"dataset prefix {prefix}: unreadable index {idx_path}: {exc}") from exc
    dtype = np.dtype(_DTYPE_CODES[code])
    if bin_path.stat().st_size != tokens * dtype.itemsize:
        raise DataToolsError(
            f"dataset prefix {prefix}: {bin_path} has {bin_path.stat().st_size} bytes but the "
            f"index describes {tokens} {dtype.name} tokens ({tokens * dtype.itemsize} bytes): "
            "truncated or mismatched files"
        )
    return IndexSummary(prefix, sequences, documents - 1, dtype, tokens)


class AtomicIndexedWriter:
    """Context manager writing one indexed dataset under temporary names.

    Usage: ``with AtomicIndexedWriter(prefix, dtype) as w: w.add_documents(...); w.commit(stats)``.
    Leaving the block without `commit` (exception, KeyboardInterrupt) deletes the temporaries.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype) -> None:
        """Takes the final output prefix and the token dtype."""
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        tag = f".partial-{os.getpid()}"
        # The tag goes after the real suffix so tools globbing *.bin / *.idx never see these.
        self.tmp_bin, self.tmp_idx, self.tmp_stats = (
            self.prefix + ".bin" + tag,
            self.prefix + ".idx" + tag,
            self.prefix + ".stats.json" + tag,
        )
        self._builder: Any = None  # megatron-core's IndexedDatasetBuilder, made by __enter__
        self.committed = False

    def __enter__(self) -> AtomicIndexedWriter:
        # Imported here: megatron-core takes seconds to import and workers never need it.
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._builder = IndexedDatasetBuilder(self.tmp_bin, dtype=self.dtype.type)
        return self

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends documents given as one flat token array and their lengths, in order."""
        start = 0
        for length in lengths.tolist():
            self._builder.add_document(tokens[start : start + length], [length])
            start += length

    def commit(self, stats: dict) -> None:
        """Finalizes the index, writes PREFIX.stats.json, and renames all three into place.

        The old .idx is removed first and the new .idx renamed last, so at no moment do the
        final names pair a new .bin with an old .idx as a readable dataset.
        """
        self._builder.finalize(self.tmp_idx)
        with open(self.tmp_stats, "w", encoding="utf-8") as handle:
            json.dump(stats, handle, indent=2)
            handle.write("\n")
        for path in (self.tmp_bin, self.tmp_idx, self.tmp_stats):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        final_idx = self.prefix + ".idx"
        for stale in (final_idx, self.prefix + ".stats.json"):
            if os.path.exists(stale):
                os.remove(stale)
        os.replace(self.tmp_bin, self.prefix + ".bin")
        os.replace(self.tmp_idx, final_idx)
        os.replace(self.tmp_stats, self.prefix + ".stats.json")
        self.committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committed:
            return
        if self._builder is not None and not self._builder.data_file.closed:
            self._builder.data_file.close()
        for path in (self.tmp_bin, self.tmp_idx, self.tmp_stats):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
