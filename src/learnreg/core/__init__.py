"""Grids and images in physical space; the single place coordinate conventions are converted.

Names load on first use, so that ``learnreg.core.errors`` (imported by the command line before
it knows what it will run) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = ["Grid", "Image", "apply_matrix", "to_grid_sample"]

_HOME = {
    "Grid": "grid",
    "apply_matrix": "grid",
    "to_grid_sample": "grid",
    "Image": "image",
}

if TYPE_CHECKING:  # pragma: no cover
    from learnreg.core.grid import Grid, apply_matrix, to_grid_sample
    from learnreg.core.image import Image


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'learnreg.core' has no attribute {name!r}")
    return getattr(import_module(f"learnreg.core.{_HOME[name]}"), name)
