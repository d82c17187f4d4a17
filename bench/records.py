"""Writing a benchmark's JSON record (shared by the bench scripts)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path, record: dict) -> None:
    """Write ``record`` to ``path`` (str or Path) atomically: a temp file beside it, then a rename,
    so a time limit or crash never leaves a half-written record. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
