"""The error users see: one line naming the file (or input) and the problem."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad user input: unreadable file, wrong dimensionality, NaNs, shape mismatch, ...

    The message must name the offending file or argument; the CLI prints it as one line and
    exits non-zero.
    """
