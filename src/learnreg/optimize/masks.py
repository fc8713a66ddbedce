"""Where the similarity of a classical registration is measured (ANTs' ``-x [fixed,moving]``).

A fixed mask weights the metric on the fixed grid; a moving mask is carried along with the
moving image (sampled where the moving image is sampled), so a voxel counts only where both
are inside. Masks are read as ``value > 0`` and put on each pyramid level by linear
resampling (soft weights at the border).
"""

from __future__ import annotations

import torch

from learnreg.core.errors import InputError
from learnreg.core.image import Image
from learnreg.spatial.sampling import resample, sample

__all__ = ["MetricMasks"]


def _binary(mask: Image, image: Image, role: str) -> Image:
    if mask.ndim != image.ndim:
        raise InputError(f"{mask.name}: {mask.ndim}D {role} mask for a {image.ndim}D image")
    inside = (mask.data[:1] > 0).float()
    if not bool(inside.any()):
        raise InputError(f"{mask.name}: the {role} mask is empty (no voxel > 0)")
    return Image(inside, mask.grid, mask.name)


class MetricMasks:
    """The masks of a registration, each optional; without both, :meth:`sample` is plain
    sampling and the weight None."""

    def __init__(
        self,
        fixed: Image,
        moving: Image,
        fixed_mask: Image | None = None,
        moving_mask: Image | None = None,
    ) -> None:
        self.fixed = None if fixed_mask is None else _binary(fixed_mask, fixed, "fixed")
        self.moving = None if moving_mask is None else _binary(moving_mask, moving, "moving")
        self._levels: dict[tuple, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.fixed is not None or self.moving is not None

    def _on(self, mask: Image, level: Image) -> torch.Tensor:
        key = (mask.name, id(mask), level.grid.shape, level.grid.spacing)
        if key not in self._levels:
            self._levels[key] = resample(mask, level.grid).batch().clamp(0, 1)
        return self._levels[key]

    def sample(
        self, fixed_level: Image, moving_level: Image, coords: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The moving level sampled at ``coords`` (``grid_sample`` coordinates, batch ``K``)
        and the metric's weight there ``(K, 1, *S)`` (None without masks)."""
        src = moving_level.batch()
        if self.moving is not None:
            src = torch.cat([src, self._on(self.moving, moving_level)], dim=1)
        out = sample(src.expand(coords.shape[0], *src.shape[1:]), coords)
        image = out[:, : moving_level.channels]
        weight = out[:, 1:] if self.moving is not None else None
        if self.fixed is not None:
            f = self._on(self.fixed, fixed_level)
            weight = f if weight is None else weight * f
        if weight is not None and weight.shape[0] != coords.shape[0]:
            weight = weight.expand(coords.shape[0], *weight.shape[1:])
        return image, weight

    def overrides(self, weight: torch.Tensor | None) -> dict:
        """Keyword arguments for the similarity terms: ``mask=weight`` when masked."""
        return {} if weight is None else {"mask": weight}
