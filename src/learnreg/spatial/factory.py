"""Create transforms by name (with deepali-style aliases)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from learnreg.core.grid import Grid
from learnreg.spatial.base import SpatialTransform
from learnreg.spatial.bspline import BSplineTransform
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.homography import Homography
from learnreg.spatial.linear import Affine, Rigid, Similarity, Translation
from learnreg.spatial.svf import StationaryVelocityField
from learnreg.spatial.tps import ThinPlateSpline

__all__ = ["TRANSFORMS", "create_transform"]


def _linear(cls: type) -> Callable[..., SpatialTransform]:
    def make(grid: Grid | None, **kw: Any) -> SpatialTransform:
        if grid is not None:
            kw.setdefault("center", torch.tensor(grid.center, dtype=torch.float32))
            if kw.get("params") is None:
                kw.setdefault("ndim", grid.ndim)
        return cls(**kw)

    return make


def _needs_grid(name: str, grid: Grid | None) -> Grid:
    if grid is None:
        raise ValueError(f"create_transform({name!r}) needs a grid")
    return grid


def _ddf(
    grid: Grid | None, field: torch.Tensor | None = None, batch: int = 1, learnable: bool = False
) -> SpatialTransform:
    g = _needs_grid("displacement", grid)
    if field is None:
        field = torch.zeros(batch, g.ndim, *g.shape)
    return DisplacementField(g, field, learnable)


def _svf(grid: Grid | None, **kw: Any) -> SpatialTransform:
    return StationaryVelocityField(_needs_grid("velocity", grid), **kw)


def _ffd(grid: Grid | None, **kw: Any) -> SpatialTransform:
    return BSplineTransform(_needs_grid("bspline", grid), **kw)


def _homography(grid: Grid | None, **kw: Any) -> SpatialTransform:
    if grid is not None and grid.ndim != 2:
        raise ValueError(f"homography is 2D only; got a {grid.ndim}D grid")
    return Homography(**kw)


def _tps(grid: Grid | None, **kw: Any) -> SpatialTransform:
    return ThinPlateSpline(**kw)


_FACTORIES: dict[str, Callable[..., SpatialTransform]] = {
    "translation": _linear(Translation),
    "rigid": _linear(Rigid),
    "similarity": _linear(Similarity),
    "affine": _linear(Affine),
    "homography": _homography,
    "displacement": _ddf,
    "velocity": _svf,
    "bspline": _ffd,
    "tps": _tps,
}
_ALIASES = {
    "ddf": "displacement",
    "dense": "displacement",
    "svf": "velocity",
    "stationary_velocity": "velocity",
    "ffd": "bspline",
    "free_form": "bspline",
    "thin_plate_spline": "tps",
}
TRANSFORMS: tuple[str, ...] = tuple(sorted([*_FACTORIES, *_ALIASES]))


def create_transform(name: str, grid: Grid | None = None, **kwargs: Any) -> SpatialTransform:
    """Build a transform by (case-insensitive) name or alias.

    Names: ``translation``, ``rigid``, ``similarity``, ``affine`` (centred on ``grid``'s
    centre when a grid is given and no ``center``), ``homography`` (2D), ``DDF`` /
    ``displacement``, ``SVF`` / ``velocity``, ``FFD`` / ``bspline``, ``TPS``. ``kwargs``
    go to the class (e.g. ``learnable=True``, ``params=…``, ``control_spacing=…``).
    Dense transforms (DDF, SVF, FFD) need ``grid``.
    """
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _FACTORIES:
        raise ValueError(f"unknown transform {name!r}; valid names: {', '.join(TRANSFORMS)}")
    return _FACTORIES[key](grid, **kwargs)
