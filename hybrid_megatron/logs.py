"""Progress and diagnostics through ``logging``: the package's loggers and a rank-0 helper.

Library modules log through :func:`get_logger` and never print; command-line tools print their
results. Nothing is configured at import: :func:`configure` (called by
``hybrid_megatron.runtime.setup``) makes the package's messages print as plain lines, progress
on stdout exactly as ``print`` wrote it (the launcher and the tests read some of those lines),
warnings and errors on stderr.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT_LOGGER = "hybrid_megatron"


def get_logger(name: str) -> logging.Logger:
    """The logger for module ``name`` (pass ``__name__``), under the package's logger."""
    if name != ROOT_LOGGER and not name.startswith(ROOT_LOGGER + "."):
        name = f"{ROOT_LOGGER}.{name}"
    return logging.getLogger(name)


def process_rank() -> int:
    """This process's global rank: torch.distributed's once initialised, else ``RANK`` (0 if unset)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def log_rank0(logger: logging.Logger, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` on global rank 0 only (every rank would repeat the same line)."""
    if process_rank() == 0:
        logger.log(level, message, stacklevel=2)


class _PlainLineHandler(logging.Handler):
    """Writes each message as one flushed line: below WARNING to ``sys.stdout``, else stderr.

    It looks the stream up at each record, so a stream swapped later (pytest's capture, a
    redirect) receives the lines.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the caller
            self.handleError(record)


def configure(level: int = logging.INFO) -> None:
    """Print the package's messages at ``level`` and above as plain lines; idempotent.

    Messages do not propagate to the root logger, so a root handler installed by another
    library (MLflow, lm-eval) does not print them a second time in its own format.
    """
    logger = logging.getLogger(ROOT_LOGGER)
    logger.setLevel(level)
    if not any(isinstance(h, _PlainLineHandler) for h in logger.handlers):
        handler = _PlainLineHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
