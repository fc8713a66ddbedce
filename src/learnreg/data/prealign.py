"""Pre-alignment of training pairs by a classical preset, cached on disk.

Training on pre-aligned pairs (``data.prealign: affine``) registers every pair before the
first step — minutes for a 3D training set on CPU. The affines are stored as ITK ``.mat``
files under a cache folder, keyed by the preset, the learnreg version and the content of both
images (data and grid, not their paths), so a second run, a resumed run or a run with another
output folder reuses them, and an edited image is registered again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from learnreg import __version__
from learnreg.core.errors import InputError
from learnreg.core.image import Image
from learnreg.io.transforms import read_affine, write_affine
from learnreg.spatial.affine import AffineTransform

__all__ = ["CachedPrealignment", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$LEARNREG_CACHE``, else ``$XDG_CACHE_HOME/learnreg``, else ``~/.cache/learnreg``."""
    if os.environ.get("LEARNREG_CACHE"):
        return Path(os.environ["LEARNREG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "learnreg"


def _digest(image: Image) -> str:
    h = hashlib.sha256()
    h.update(repr(image.grid.to_dict()).encode())
    h.update(np.ascontiguousarray(image.data.detach().cpu().numpy()).tobytes())
    return h.hexdigest()


class CachedPrealignment:
    """``(fixed, moving) → AffineTransform`` by the classical ``preset``, computed once per
    content and kept in ``folder/prealign`` (default :func:`default_cache_dir`). ``hits``
    and ``misses`` count what this instance reused and computed."""

    def __init__(self, preset: str, folder: Path | None = None) -> None:
        self.preset = preset
        self.folder = Path(folder or default_cache_dir()) / "prealign"
        self.hits = self.misses = 0
        self.last_was_cached = False

    def path(self, fixed: Image, moving: Image) -> Path:
        key = hashlib.sha256(
            "\n".join((self.preset, __version__, _digest(fixed), _digest(moving))).encode()
        ).hexdigest()[:32]
        return self.folder / f"{self.preset}-{key}.mat"

    def __call__(self, fixed: Image, moving: Image) -> AffineTransform:
        from learnreg.optimize.classical import register

        path = self.path(fixed, moving)
        if path.is_file():
            try:
                transform = read_affine(path)
                self.hits += 1
                self.last_was_cached = True
                return transform
            except InputError:  # an unreadable cache entry is recomputed
                pass
        transform = register(fixed, moving, self.preset).linear()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_affine(path, transform)  # atomic: a killed run leaves no half file
        except OSError:
            pass  # a read-only cache only costs the time
        self.misses += 1
        self.last_was_cached = False
        return transform
