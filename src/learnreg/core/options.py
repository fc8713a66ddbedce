"""One check for string (and other enumerated) options, with a close-match suggestion."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import TypeVar

__all__ = ["check_option"]

T = TypeVar("T")


def check_option(
    name: str, value: T, valid: Sequence[object], error: type[Exception] = ValueError
) -> T:
    """Return ``value`` if it is one of ``valid``; else raise ``error`` (ValueError, or e.g.
    :class:`~learnreg.core.errors.InputError` for configs) naming ``name``, the valid values
    and, for strings, the closest match (``"lnc"`` → did you mean ``'lncc'``?)."""
    if value in valid:
        return value
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [v for v in valid if isinstance(v, str)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise error(f"{name} must be one of {tuple(valid)}, got {value!r}{hint}")
