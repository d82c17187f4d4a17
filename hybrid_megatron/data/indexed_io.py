"""Writing megatron-core indexed datasets atomically, and checking existing ones.

Writing goes through megatron-core's `IndexedDatasetBuilder` into temporary files that are
renamed to PREFIX.bin / PREFIX.idx only after the index is complete; an error, Ctrl-C or
SIGTERM removes them, and even a SIGKILL leaves nothing under the final names (the .idx,
renamed last, marks a complete dataset). Replacing a dataset keeps the old pair complete
until the new one is (see `AtomicIndexedWriter.commit`).

Checking reads the .idx header and arrays with numpy (no megatron import): pointers that
disagree with the lengths, document indices out of order, a .bin size other than the index
describes, each reported with the file. `max_token_id` finds the largest token of a .bin.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_megatron.data.errors import DataToolsError

_MAGIC = b"MMIDIDX\x00\x00"
# Suffix of the files an AtomicIndexedWriter commit moves aside until the new ones are in place.
_PREVIOUS = ".previous"
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
            previous = Path(str(idx_path) + _PREVIOUS)
            hint = (
                f" ({previous} is the previous dataset's index, moved aside by an interrupted "
                "write: rerun the preprocessing, which puts it back first)"
                if previous.is_file()
                else ""
            )
            raise DataToolsError(f"dataset prefix {prefix}: {path} does not exist{hint}")
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
        dtype = np.dtype(_DTYPE_CODES[code])
        tokens = _check_index_arrays(idx_path, len(header), sequences, documents, dtype.itemsize)
    except (OSError, ValueError, struct.error) as exc:
        raise DataToolsError(f"dataset prefix {prefix}: unreadable index {idx_path}: {exc}") from exc
    if bin_path.stat().st_size != tokens * dtype.itemsize:
        raise DataToolsError(
            f"dataset prefix {prefix}: {bin_path} has {bin_path.stat().st_size} bytes but the "
            f"index describes {tokens} {dtype.name} tokens ({tokens * dtype.itemsize} bytes): "
            "truncated or mismatched files"
        )
    return IndexSummary(prefix, sequences, documents - 1, dtype, tokens)


def max_token_id(summary: IndexSummary, block_tokens: int = 1 << 26) -> int:
    """The largest token id in the .bin of a checked dataset (`check_indexed_prefix`'s summary).

    One sequential, vectorised pass over the file in blocks of ``block_tokens`` (memory stays
    bounded); -1 for an empty dataset.
    """
    largest = -1
    tokens = np.memmap(summary.prefix + ".bin", summary.dtype, "r") if summary.tokens else None
    for start in range(0, summary.tokens, block_tokens):
        assert tokens is not None
        largest = max(largest, int(tokens[start : start + block_tokens].max()))
    del tokens
    return largest


def _check_index_arrays(idx_path: Path, offset: int, sequences: int, documents: int, itemsize: int) -> int:
    """The token count of an .idx whose arrays agree; raises ValueError saying where they don't.

    Takes the .idx path, where its arrays start, the header's counts and the token size. The
    pointers must be the running byte offsets of the lengths, and the document indices must
    rise from 0 to the sequence count: megatron-core trusts both and would read the wrong
    tokens or past the .bin. One vectorised pass over the index (12 bytes a sequence).
    """
    if documents < 1:
        raise ValueError("no document indices (a valid index has at least the leading 0)")
    lengths = np.memmap(idx_path, np.int32, "r", offset=offset, shape=(sequences,)) if sequences else None
    if lengths is None:
        tokens = 0
    else:
        if (lengths < 0).any():
            raise ValueError(f"negative sequence length at sequence {int(np.argmax(lengths < 0))}")
        pointers = np.memmap(idx_path, np.int64, "r", offset=offset + 4 * sequences, shape=(sequences,))
        expected = np.zeros(sequences, np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
        expected *= itemsize
        wrong = np.flatnonzero(pointers != expected)
        if wrong.size:
            i = int(wrong[0])
            raise ValueError(
                f"sequence {i} points at byte {int(pointers[i])} but the lengths before it put it "
                f"at byte {int(expected[i])}: pointers and lengths disagree"
            )
        tokens = int(lengths.sum(dtype=np.int64))
        del lengths, pointers
    indices = np.memmap(idx_path, np.int64, "r", offset=offset + 12 * sequences, shape=(documents,))
    if indices[0] != 0 or indices[-1] != sequences or (np.diff(indices) < 0).any():
        raise ValueError(
            f"document indices must rise from 0 to the {sequences} sequences, "
            f"got {int(indices[0])} .. {int(indices[-1])}"
        )
    return tokens


def _final_names(prefix: str) -> tuple[str, str, str]:
    """PREFIX.idx, PREFIX.bin, PREFIX.stats.json: the .idx first, the file that marks a dataset."""
    return prefix + ".idx", prefix + ".bin", prefix + ".stats.json"


def restore_previous(prefix: str | os.PathLike) -> bool:
    """Put back the dataset an interrupted `AtomicIndexedWriter.commit` had moved aside.

    When PREFIX.idx is missing and ``PREFIX.idx.previous`` exists, the old .idx comes back
    last, after the old .bin and stats. The commit moves the .idx aside first, the stats next
    and the .bin last, and publishes new files only after that: without a
    ``PREFIX.bin.previous`` the old .bin is still in place; with one, a stats file under the
    final name without a ``.previous`` one is the new dataset's, removed. Returns whether
    anything was restored.
    """
    idx, bin_, stats = _final_names(str(prefix))
    if os.path.exists(idx) or not os.path.exists(idx + _PREVIOUS):
        return False
    moved_bin = os.path.exists(bin_ + _PREVIOUS)
    if moved_bin:
        os.replace(bin_ + _PREVIOUS, bin_)
    if os.path.exists(stats + _PREVIOUS):
        os.replace(stats + _PREVIOUS, stats)
    elif moved_bin and os.path.exists(stats):
        os.remove(stats)
    if not os.path.exists(bin_):
        return False  # not a commit's leftovers: left for the user
    os.replace(idx + _PREVIOUS, idx)
    return True


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

        try:
            Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
            restore_previous(self.prefix)
            self._builder = IndexedDatasetBuilder(self.tmp_bin, dtype=self.dtype.type)
        except OSError as err:
            raise self._write_error(err) from None
        return self

    def _write_error(self, err: OSError) -> DataToolsError:
        """The one-line error for an output file that cannot be written (permissions, a full
        disk, a file where a folder should be), naming the file and the cause."""
        return DataToolsError(
            f"output prefix {self.prefix}: cannot write {err.filename or self.tmp_bin}: {err.strerror or err}"
        )

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends documents given as one flat token array and their lengths, in order."""
        start = 0
        try:
            for length in lengths.tolist():
                self._builder.add_document(tokens[start : start + length], [length])
                start += length
        except OSError as err:
            raise self._write_error(err) from None

    def commit(self, stats: dict) -> None:
        """Finalizes the index, writes PREFIX.stats.json, and renames all three into place.

        The .idx marks a complete dataset, so it leaves the final names first and arrives last:
        the old files are renamed to ``PREFIX.*.previous`` (.idx first), the new ones take the
        final names (.idx last), then the previous ones are deleted. A crash at any point leaves
        the old or the new complete pair under the final names, or, between the renames, no
        .idx there and the old one as ``PREFIX.idx.previous`` with its .bin (moved aside or
        still in place), which the next writer (or `restore_previous`) puts back.
        """
        try:
            self._publish(stats)
        except OSError as err:
            restore_previous(self.prefix)
            raise self._write_error(err) from None

    def _publish(self, stats: dict) -> None:
        self._builder.finalize(self.tmp_idx)
        with open(self.tmp_stats, "w", encoding="utf-8") as handle:
            json.dump(stats, handle, indent=2)
            handle.write("\n")
        for path in (self.tmp_bin, self.tmp_idx, self.tmp_stats):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        final = _final_names(self.prefix)  # idx, bin, stats
        if os.path.exists(final[0]):
            for path in (final[0], final[2], final[1]):  # the .bin last: see restore_previous
                if os.path.exists(path):
                    os.replace(path, path + _PREVIOUS)
        for path in final:  # an old .bin/.stats without an .idx is no dataset: not kept
            if os.path.exists(path):
                os.remove(path)
        os.replace(self.tmp_bin, final[1])
        os.replace(self.tmp_stats, final[2])
        os.replace(self.tmp_idx, final[0])
        self.committed = True
        for path in final:
            if os.path.exists(path + _PREVIOUS):
                os.remove(path + _PREVIOUS)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committed:
            return
        if self._builder is not None and not self._builder.data_file.closed:
            with contextlib.suppress(OSError):  # a full disk fails the flush; the file goes anyway
                self._builder.data_file.close()
        for path in (self.tmp_bin, self.tmp_idx, self.tmp_stats):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
