"""Directory trees as a corpus: one document per text file, filtered, de-duplicated, split by file.

A tree is walked in sorted order. A file is listed when its path relative to the tree's root
matches an include glob and no exclude glob, and it is a regular file (not a symlink), not empty
and not over the size cap. Reading it decides the rest: content with a NUL byte or that is not
UTF-8 is binary and skipped; content seen before (same sha256, in listing order) is an exact
duplicate and skipped. A file's split depends on its relative path alone (its sha256 mapped to
[0, 1) against the validation fraction), so adding or removing other files never moves a file
between training and validation, and a file installed under two roots lands on the same side.

Globs are fnmatch patterns (``*`` also crosses ``/``) matched against the relative path; a
pattern without ``/`` also matches the bare file name. Excludes prune whole directories.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from hybrid_megatron.data.errors import DataToolsError

SPLITS = ("train", "valid")


@dataclass(frozen=True)
class TreeSelection:
    """Which files of which trees make the corpus (the tree flags of the data tools).

    ``roots``: tree directories (a source each, in this order); ``include`` / ``exclude``: globs
    (see the module docstring); ``max_file_bytes``: larger files are skipped;
    ``valid_fraction``: the share of files, by relative-path hash, held out for validation.
    """

    roots: tuple[str, ...]
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    max_file_bytes: int = 1 << 20
    valid_fraction: float = 0.0

    def check(self) -> None:
        """Raises DataToolsError for a missing root, a bad size cap or fraction."""
        if not self.roots:
            raise DataToolsError("no input tree given")
        for root in self.roots:
            if not os.path.isdir(root):
                raise DataToolsError(f"{root}: input tree is not a directory")
        if self.max_file_bytes < 1:
            raise DataToolsError(f"--max-file-bytes must be >= 1, got {self.max_file_bytes}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise DataToolsError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")

    def describe(self) -> dict:
        """The selection as JSON-ready data (recorded in manifests)."""
        return {
            "roots": list(self.roots),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "max_file_bytes": self.max_file_bytes,
            "valid_fraction": self.valid_fraction,
        }


@dataclass(frozen=True)
class TreeFile:
    """A listed file: its source (index into the roots), path relative to the root, size, split."""

    source: int
    relpath: str
    size: int
    split: str

    def path(self, selection: TreeSelection) -> str:
        """The file's path on disk."""
        return os.path.join(selection.roots[self.source], self.relpath)


@dataclass
class SourceCounts:
    """One root's yield: files listed and skipped while walking (symlinks, empty, over the
    cap) or reading (binary, unreadable, duplicate), and documents, bytes, tokens per split."""

    root: str
    listed: int = 0
    listed_bytes: int = 0
    too_large: int = 0
    links: int = 0
    empty: int = 0
    binary: int = 0
    unreadable: int = 0
    duplicates: int = 0
    documents: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    bytes: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))


def matches(relpath: str, patterns: tuple[str, ...]) -> bool:
    """Whether a relative path matches any glob (a pattern without ``/`` also matches the name)."""
    name = relpath.rpartition("/")[2]
    return any(
        fnmatch.fnmatchcase(relpath, pattern) or ("/" not in pattern and fnmatch.fnmatchcase(name, pattern))
        for pattern in patterns
    )


def split_of(relpath: str, valid_fraction: float) -> str:
    """ "valid" when the relative path's sha256, read as a number in [0, 1), is below the fraction."""
    if valid_fraction <= 0.0:
        return "train"
    value = int.from_bytes(_path_hash(relpath)[:8], "big")
    return "valid" if value / 2.0**64 < valid_fraction else "train"


def _path_hash(relpath: str) -> bytes:
    return hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).digest()


def list_tree_files(selection: TreeSelection) -> tuple[list[TreeFile], list[SourceCounts]]:
    """Lists the selected files of every root, training files first, each group in
    (source, relative path) order; returns them and per-root counts. Raises DataToolsError
    (see `TreeSelection.check`)."""
    selection.check()
    files: list[TreeFile] = []
    counts = []
    for source, root in enumerate(selection.roots):
        tally = SourceCounts(root)
        for relpath, size in _walk(root, selection, tally):
            files.append(TreeFile(source, relpath, size, split_of(relpath, selection.valid_fraction)))
            tally.listed += 1
            tally.listed_bytes += size
        counts.append(tally)
    order = {name: rank for rank, name in enumerate(SPLITS)}
    files.sort(key=lambda f: order[f.split])  # stable: (source, path) order within a split
    return files, counts


def _walk(root: str, selection: TreeSelection, tally: SourceCounts) -> Iterator[tuple[str, int]]:
    """(relative path, size) of the selected regular files under root, in sorted order."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = sorted(os.scandir(os.path.join(root, rel_dir)), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable directory holds nothing we can use
        subdirs = []
        for entry in entries:
            relpath = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if selection.exclude and matches(relpath, selection.exclude):
                continue
            if entry.is_symlink():
                tally.links += 1
                continue
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(relpath)
                continue
            if not entry.is_file(follow_symlinks=False) or not matches(relpath, selection.include):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            if size == 0:
                tally.empty += 1
            elif size > selection.max_file_bytes:
                tally.too_large += 1
            else:
                yield relpath, size
        stack.extend(reversed(subdirs))  # depth-first, in name order


def read_text_file(path: str) -> tuple[str | None, str | None, str]:
    """Reads one file as a document: (text, None, sha256 hex of its bytes) or (None, reason it
    is skipped, sha256 or "")."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}", ""
    digest = hashlib.sha256(data).hexdigest()
    if b"\0" in data:
        return None, "binary", digest
    try:
        return data.decode("utf-8"), None, digest
    except UnicodeDecodeError:
        return None, "binary", digest


def iter_tree_texts(selection: TreeSelection, max_bytes: int | None = None) -> Iterator[str]:
    """The texts of the training files, each distinct content once (one process; for
    tokenizer training). With ``max_bytes``: a deterministic sample, files taken in the order
    of their relative path's hash until that many bytes of text."""
    files, _ = list_tree_files(selection)
    train = [f for f in files if f.split == "train"]
    if max_bytes is not None:
        train.sort(key=lambda f: (_path_hash(f.relpath), f.source))
    seen: set[str] = set()
    taken = 0
    for item in train:
        if max_bytes is not None and taken >= max_bytes:
            return
        text, problem, digest = read_text_file(item.path(selection))
        if problem is not None or text is None or digest in seen:
            continue
        seen.add(digest)
        taken += item.size
        yield text


def files_digest(lines: list[str]) -> str:
    """sha256 over the newline-joined manifest lines (one per kept file): the corpus' identity."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def add_tree_arguments(parser: argparse.ArgumentParser, source: argparse._MutuallyExclusiveGroup) -> None:
    """Adds --input-tree (to the group of input sources) and the selection flags to a data
    tool's parser (preprocessing and tokenizer training read trees alike)."""
    source.add_argument(
        "--input-tree",
        nargs="+",
        metavar="DIR",
        help="directory trees, one document per text file (binary files, exact duplicates skipped)",
    )
    parser.add_argument(
        "--include",
        nargs="+",
        default=["*"],
        metavar="GLOB",
        help="--input-tree: files whose path below the root (or name) matches one of these (default *)",
    )
    parser.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="GLOB",
        help="--input-tree: skip files and whole directories whose path (or name) matches",
    )
    parser.add_argument(
        "--max-file-bytes",
        type=int,
        default=1 << 20,
        help="--input-tree: skip larger files (default 1 MiB)",
    )
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=0.0,
        help="--input-tree: share of files (by hash of the relative path) held out for validation",
    )


def tree_selection(args: argparse.Namespace) -> TreeSelection | None:
    """The TreeSelection of parsed arguments (see `add_tree_arguments`), or None without trees."""
    if not args.input_tree:
        return None
    return TreeSelection(
        roots=tuple(args.input_tree),
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        max_file_bytes=args.max_file_bytes,
        valid_fraction=args.valid_fraction,
    )
