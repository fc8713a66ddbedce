"""Atomic file writes: a killed run never leaves a half-written output in place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from learnreg.core.errors import InputError

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` to; move it (and siblings) into place on success.

    The temporary file has the same name as ``path`` inside a fresh hidden folder in the same
    directory, so writers that pick a format from the extension, or write companion files (a
    MetaImage ``.mhd`` and its ``.raw``), work unchanged; every file written there is synced
    and moved next to ``path`` with :func:`os.replace` (atomic on one filesystem). Files keep
    the permissions the umask gives them.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: cannot write, folder {parent} does not exist")
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise InputError(f"{path}: cannot write to folder {parent} ({e.strerror or e})") from None
    try:
        yield tmpdir / path.name
        for f in sorted(tmpdir.iterdir()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(f, parent / f.name)
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
