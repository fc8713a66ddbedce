"""An image: a channels-first tensor placed on a :class:`Grid`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid

__all__ = ["Image"]


@dataclass
class Image:
    """Image data ``(C, *S)`` on a physical grid; ``S`` matches ``grid.shape``.

    ``name`` is used in error messages (usually the file it came from).
    """

    data: torch.Tensor
    grid: Grid
    name: str = "<image>"

    def __post_init__(self) -> None:
        if self.data.dim() != self.grid.ndim + 1:
            raise ValueError(
                f"{self.name}: data of shape {tuple(self.data.shape)} does not match a "
                f"{self.grid.ndim}D grid (expected (C, *{self.grid.shape}))"
            )
        if tuple(self.data.shape[1:]) != self.grid.shape:
            raise ValueError(
                f"{self.name}: data shape {tuple(self.data.shape[1:])} != grid shape {self.grid.shape}"
            )

    @property
    def ndim(self) -> int:
        return self.grid.ndim

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])

    def batch(self) -> torch.Tensor:
        """The data as a batch of one, ``(1, C, *S)``."""
        return self.data.unsqueeze(0)

    def with_data(self, data: torch.Tensor, name: str | None = None) -> Image:
        """A new image on the same grid."""
        return Image(data, self.grid, self.name if name is None else name)

    def to(self, *args, **kwargs) -> Image:
        return Image(self.data.to(*args, **kwargs), self.grid, self.name)

    def validate_intensities(self) -> Image:
        """Raise :class:`InputError` for NaN/inf, empty or constant images; return self."""
        d = self.data
        if d.numel() == 0:
            raise InputError(f"{self.name}: image is empty")
        if not torch.isfinite(d).all():
            n = int((~torch.isfinite(d)).sum())
            raise InputError(f"{self.name}: image contains {n} NaN or infinite values")
        if float(d.max()) == float(d.min()):
            raise InputError(f"{self.name}: image is constant (all values = {float(d.min()):g})")
        return self
