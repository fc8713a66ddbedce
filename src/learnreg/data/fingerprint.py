"""Recognizing an atlas again: a model trained atlas-to-subject records its fixed image's
fingerprint, so the automatic choice can tell that image from any other brain."""

from __future__ import annotations

from pathlib import Path

import torch

from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.optimize.pyramid import Pyramid, normalize_intensity

__all__ = ["ATLAS_LEVEL", "ATLAS_MIN_CORRELATION", "atlas_fingerprint", "is_atlas"]

ATLAS_LEVEL = 4
"""Shrink factor of the thumbnail that recognizes an atlas."""
ATLAS_MIN_CORRELATION = 0.99
"""Correlation of an image's thumbnail with the atlas's from which it is the atlas (LPBA40 at
1/4: S01 with itself 1.0, with twelve other subjects 0.857–0.975)."""


def atlas_fingerprint(image: Image) -> dict:
    """The image's name, grid and a float16 thumbnail (the normalized image on the
    1/:data:`ATLAS_LEVEL` pyramid level; 160 KB for a 1 mm brain)."""
    thumb = Pyramid(normalize_intensity(image)).level(ATLAS_LEVEL).data[0]
    return {"name": Path(image.name).name, "grid": image.grid.to_dict(), "thumbnail": thumb.half()}


def is_atlas(image: Image, fingerprint: dict) -> bool:
    """Whether ``image`` is the atlas of ``fingerprint``: the same grid and thumbnails
    correlated at ≥ :data:`ATLAS_MIN_CORRELATION`."""
    if not image.grid.allclose(Grid.from_dict(fingerprint["grid"]), atol=1e-3):
        return False
    theirs = torch.as_tensor(fingerprint["thumbnail"]).double().flatten()
    ours = atlas_fingerprint(image)["thumbnail"].double().flatten()
    if ours.shape != theirs.shape:
        return False
    return bool(torch.corrcoef(torch.stack([ours, theirs]))[0, 1] >= ATLAS_MIN_CORRELATION)
