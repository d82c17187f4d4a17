"""Outputs written all at once: a reader (or a crash) never sees a half-written directory or JSON
record, and a non-empty directory is replaced only when the user asked for it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path


def refuse_to_replace(output: Path, overwrite: bool) -> None:
    """Raise FileExistsError naming ``output`` when it exists, is not empty and ``overwrite`` is
    false (the CLIs' --overwrite). Returns nothing."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise FileExistsError(f"{output}: exists and is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_directory(output: Path):
    """Yields a fresh hidden sibling of ``output`` to fill in. When the body finishes it takes
    ``output``'s place; when the body raises it is deleted and ``output`` is untouched.

    An existing ``output`` is first renamed aside and deleted only after the new one is in
    place, so a crash between the two renames leaves the old copy as ``.NAME.old-*``, never
    neither copy; a crash while writing leaves only a ``.NAME.partial-*`` sibling.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = output.parent / f".{output.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if output.exists() or output.is_symlink():
            old = output.parent / f".{output.name}.old-{tag}"
            os.replace(output, old)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def umask_file_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` gives a new file: ``0o666`` less this
    process's umask. Read from /proc on Linux, which leaves the umask untouched; elsewhere the
    umask can only be read by setting it, briefly."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def give_umask_mode(path) -> None:
    """Set ``path``'s permission bits to :func:`umask_file_mode`: for files that a library writes
    private (safetensors writes 0600 through a temp file), which a serving process run by another
    user must read like every other file of the output. Returns nothing."""
    os.chmod(path, umask_file_mode())


def write_json_atomically(path, record: dict) -> None:
    """Write ``record`` to ``path`` (str or Path) as indented JSON: a temp file beside it, then a
    rename, so a time limit or crash never leaves a half-written record. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
