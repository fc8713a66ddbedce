"""What every command sets up before it works: threads, seeds, logging."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from learnreg.core.errors import InputError

__all__ = ["configure", "logging_into", "parse_transform_argument"]

LOG_FILE = "learnreg.log"


def configure(threads: int | None = None, seed: int = 0) -> None:
    """Set torch's CPU threads (when given) and seed Python's and torch's generators."""
    import torch

    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def logging_into(folder: Path | None, verbose: int) -> Iterator[None]:
    """Show learnreg's warnings on stderr as ``warning: ...`` lines; with ``verbose`` 1 (2+)
    also its INFO (DEBUG) messages, timestamped, on stderr and in ``folder/learnreg.log``.
    Replaces, for its duration, the handlers an outer ``logging_into`` installed."""
    logger = logging.getLogger("learnreg")
    if verbose <= 0:
        level, fmt = logging.WARNING, _OneLine()
    else:
        level = logging.INFO if verbose == 1 else logging.DEBUG
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if folder is not None and verbose > 0:
        handlers.append(logging.FileHandler(folder / LOG_FILE, encoding="utf-8"))
    old, outer = logger.level, list(logger.handlers)
    for h in outer:
        logger.removeHandler(h)
    logger.setLevel(level)
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        for h in outer:
            logger.addHandler(h)
        logger.setLevel(old)


class _OneLine(logging.Formatter):
    """``warning: message``, as the command line's error lines."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


_INVERTED = re.compile(r"^\[\s*(.+?)\s*,\s*([01])\s*\]$")


def parse_transform_argument(text: str) -> str | tuple[str, bool]:
    """``FILE`` or ANTs' ``[FILE,1]`` (its inverse) / ``[FILE,0]``."""
    m = _INVERTED.match(text.strip())
    if m is None:
        return text
    return m.group(1), m.group(2) == "1"
