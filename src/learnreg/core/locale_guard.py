"""Keep the process locale across calls into libraries that change it.

ITK's DICOM (GDCM) I/O sets the C locale process-wide; afterwards Python decodes subprocess
output and text files without an explicit encoding as ASCII. SimpleITK calls run inside
:func:`keep_locale`, which puts the locale back.
"""

from __future__ import annotations

import locale
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["keep_locale"]


@contextmanager
def keep_locale() -> Iterator[None]:
    """Restore every locale category on exit, whatever the body set."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        try:
            locale.setlocale(locale.LC_ALL, saved)
        except locale.Error:  # pragma: no cover - the saved locale was valid a moment ago
            pass
