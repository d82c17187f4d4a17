"""Shared helpers for the data tools tests: paths of the bundled demo assets, small corpora."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DATA = REPO / "data"
CORPUS = DATA / "austen.jsonl"
TOKENIZER_DIR = DATA / "tokenizer"
DEMO_PREFIX = str(DATA / "austen_4k_text_document")


def corpus_records(limit: int | None = None) -> list[dict]:
    """Returns the first `limit` records (all when None) of the bundled corpus."""
    records = []
    with open(CORPUS, encoding="utf-8") as handle:
        for line in handle:
            records.append(json.loads(line))
            if limit is not None and len(records) == limit:
                break
    return records


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Writes records as jsonl; `raw_lines` {0-based position: text} inserts verbatim lines."""
    lines = [json.dumps(r) for r in records]
    for position, text in sorted((raw_lines or {}).items()):
        lines.insert(position, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def names_in(directory: Path) -> list[str]:
    """Returns the sorted file names in a directory."""
    return sorted(os.listdir(directory))


def run_tool(tool: str, *args: str, timeout: int = 120, **popen) -> subprocess.CompletedProcess:
    """Runs `python data_tools/<tool>.py args...` from the repo root; returns the result."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(REPO / "data_tools" / f"{tool}.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )
