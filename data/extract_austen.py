"""Extract Jane Austen's six novels from the Debian package r-cran-janeaustenr into jsonl.

The package stores each novel as an R character vector (one element per printed line) inside
R's lazy-load database (data/Rdata.rdx + data/Rdata.rdb). R is not needed: this script reads
R's XDR serialisation format directly (only the few record types those files use).

Usage (see data/README.md):
    apt-get download r-cran-janeaustenr
    dpkg-deb -x r-cran-janeaustenr_1.0.0-1_all.deb /tmp/janeaustenr
    python data/extract_austen.py /tmp/janeaustenr/usr/lib/R/site-library/janeaustenr \
        --output data/austen.jsonl

Each output line is one chapter: {"id", "book", "chapter", "text"}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import struct
import sys
import zlib
from pathlib import Path

# Object names inside the package -> printed titles, in publication order.
BOOKS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

# R serialisation type codes used by these files.
_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC, _REF = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255
_SPECIAL = {242, 249, 250, 251, 252, 253, 254}


class _RReader:
    """Minimal reader for R's XDR ("X\\n") serialisation; returns plain Python values."""

    def __init__(self, blob: bytes) -> None:
        """Takes the uncompressed serialised bytes."""
        self.blob, self.pos, self.refs = blob, 0, []

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.blob, self.pos)
        self.pos += 4
        return value

    def read(self):
        """Parses the header and returns the top-level object."""
        if self.blob[:2] != b"X\n":
            raise ValueError("not an XDR R serialisation")
        self.pos = 2
        version = self._int()
        self._int(), self._int()  # writer and minimal reader versions: irrelevant here
        if version == 3:
            length = self._int()
            self.pos += length  # skip the native encoding name
        return self._item()

    def _item(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in _SPECIAL:
            return None
        if kind == _REF:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind == _SYM:
            symbol = ("sym", self._item())
            self.refs.append(symbol)
            return symbol
        if kind == _CHAR:
            length = self._int()
            if length == -1:
                return None  # NA_character_
            raw = self.blob[self.pos : self.pos + length]
            self.pos += length
            # Bit 3 of the level field marks UTF-8 strings; others are Latin-1 here.
            return raw.decode("utf-8" if flags & (1 << 3) else "latin-1")
        if kind == _LIST:
            attrs = self._item() if has_attr else None
            tag = self._item() if has_tag else None
            head, tail = self._item(), self._item()
            del attrs
            return [(tag, head)] + (tail if isinstance(tail, list) else [])
        if kind in (_STR, _VEC):
            values = [self._item() for _ in range(self._int())]
        elif kind in (_INT, _LGL):
            count = self._int()
            values = list(struct.unpack_from(f">{count}i", self.blob, self.pos))
            self.pos += 4 * count
        elif kind == _REAL:
            count = self._int()
            values = list(struct.unpack_from(f">{count}d", self.blob, self.pos))
            self.pos += 8 * count
        else:
            raise ValueError(f"unsupported R type {kind} at byte {self.pos}")
        attrs = self._item() if has_attr else None
        if attrs:
            names = dict((tag[1], value) for tag, value in attrs if tag).get("names")
            if names is not None:
                return dict(zip(names, values))
        return values


def read_lazyload_db(package_dir: Path) -> dict[str, list[str]]:
    """Reads every object of <package_dir>/data/Rdata.{rdx,rdb}; returns {name: lines}."""
    index = _RReader(gzip.decompress((package_dir / "data" / "Rdata.rdx").read_bytes())).read()
    blob = (package_dir / "data" / "Rdata.rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[offset : offset + length]
        # Each entry: 4-byte big-endian uncompressed size, then a zlib stream.
        objects[name] = _RReader(zlib.decompress(chunk[4:])).read()
    return objects


_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)
_VOLUME = re.compile(r"^\s*volume\s+[ivxlc\d]+\s*$", re.IGNORECASE)


def _tidy(lines: list[str]) -> str:
    """Joins lines, collapsing runs of blank lines to one and trimming the ends."""
    text = "\n".join(line.rstrip() for line in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_chapters(lines: list[str]) -> list[str]:
    """Splits a novel's lines into chapters; front matter goes with chapter 1.

    Takes the novel's printed lines; returns one string per chapter, in order.
    """
    starts = [i for i, line in enumerate(lines) if _CHAPTER.match(line or "")]
    if not starts:
        return [_tidy(lines)]
    bounds = [0] + starts[1:] + [len(lines)]
    chapters = [list(lines[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    # A "VOLUME II" heading printed just before a chapter belongs to the next chapter.
    for i in range(len(chapters) - 1):
        tail = chapters[i]
        while tail and (not (tail[-1] or "").strip() or _VOLUME.match(tail[-1] or "")):
            moved = tail.pop()
            if moved and moved.strip():
                chapters[i + 1].insert(0, moved)
    return [_tidy([line or "" for line in chapter]) for chapter in chapters]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package_dir", type=Path, help="…/site-library/janeaustenr")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "austen.jsonl")
    args = parser.parse_args(argv)
    objects = read_lazyload_db(args.package_dir)
    missing = sorted(set(BOOKS) - set(objects))
    if missing:
        print(f"error: {args.package_dir} lacks {missing}", file=sys.stderr)
        return 1
    count = 0
    with open(args.output, "w", encoding="utf-8", newline="\n") as out:
        for key, title in BOOKS.items():
            for number, text in enumerate(split_chapters(objects[key]), start=1):
                record = {"id": f"{key}-{number:03d}", "book": title, "chapter": number, "text": text}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    print(f"wrote {count} chapters to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
