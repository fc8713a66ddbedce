"""Dense displacement fields living on a grid."""

from __future__ import annotations

import torch

from learnreg.core.grid import Grid
from learnreg.spatial.base import SpatialTransform
from learnreg.spatial.fields import (
    compose_displacements,
    invert_displacement,
    resize_displacement,
)
from learnreg.spatial.sampling import regular_coords, sample
from learnreg.spatial.separable import separable_resample

__all__ = ["DisplacementField"]


class DisplacementField(SpatialTransform):
    """``x ↦ x + u(x)``, with ``u`` sampled linearly from a field on ``grid``.

    ``field`` is ``(N, D, *S)`` in voxel units of ``grid`` along its index axes (the
    convention inside networks); outside the grid the displacement is zero, as in ITK.
    """

    def __init__(self, grid: Grid, field: torch.Tensor, learnable: bool = False) -> None:
        super().__init__()
        if field.dim() != grid.ndim + 2 or field.shape[1] != grid.ndim:
            raise ValueError(
                f"displacement field must be (N, {grid.ndim}, *{grid.shape}); got {tuple(field.shape)}"
            )
        if tuple(field.shape[2:]) != grid.shape:
            raise ValueError(f"field shape {tuple(field.shape[2:])} != grid shape {grid.shape}")
        self.grid = grid
        self.ndim = grid.ndim
        if learnable:
            self.field = torch.nn.Parameter(field)
        else:
            self.register_buffer("field", field)

    @classmethod
    def zeros(cls, grid: Grid, batch: int = 1, learnable: bool = False) -> DisplacementField:
        return cls(grid, torch.zeros(batch, grid.ndim, *grid.shape), learnable)

    @classmethod
    def from_world(cls, grid: Grid, world_field: torch.Tensor) -> DisplacementField:
        """From a displacement in world mm, channels-first ``(N, D, *S)``."""
        vox = grid.world_vectors_to_index(world_field.movedim(1, -1)).movedim(-1, 1)
        return cls(grid, vox.contiguous())

    def voxel_field(self) -> torch.Tensor:
        """The displacement in voxel units of :attr:`grid`, ``(N, D, *S)``."""
        return self.field

    def world_field(self) -> torch.Tensor:
        """The displacement in world mm on :attr:`grid`, ``(N, D, *S)``."""
        f = self.voxel_field()
        return self.grid.index_vectors_to_world(f.movedim(1, -1)).movedim(-1, 1)

    def voxel_displacement(self, grid: Grid, batch: int | None = None) -> torch.Tensor:
        """The field in voxel units of ``grid``: the field itself on its own grid, resized
        (``F.interpolate``) on a :meth:`~learnreg.core.Grid.resized` copy of it, otherwise
        sampled at ``grid``'s world points (zero outside this field's grid)."""
        return on_grid(self.grid, self.voxel_field(), grid, batch, self._sampled_on)

    def _sampled_on(self, grid: Grid, batch: int | None = None) -> torch.Tensor:
        """The field sampled at ``grid``'s voxel centres (zero outside this field's grid), in
        ``grid``'s voxel units: vectors converted on this (small) grid, then interpolated
        axis by axis (:mod:`~learnreg.spatial.separable`) or by one ``grid_sample``."""
        d = self.ndim
        lin = torch.from_numpy(grid.inverse_affine[:d, :d] @ self.grid.affine[:d, :d])
        f = torch.einsum("ij,nj...->ni...", lin.to(self.field), self.field)
        out = separable_resample(f, grid, self.grid)
        if out is None:
            coords = regular_coords(grid, self.grid, None, f.device).to(f.dtype)
            out = sample(f, coords.expand(f.shape[0], *coords.shape[1:]), "linear", "zeros")
        if batch is not None and batch != out.shape[0]:
            out = out.expand(batch, *out.shape[1:])
        return out

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        f = self.world_field()
        if points.shape[0] != f.shape[0] and f.shape[0] == 1:
            f = f.expand(points.shape[0], *f.shape[1:])
        flat = points.reshape(points.shape[0], -1, *([1] * (self.ndim - 1)), self.ndim)
        coords = self.grid.world_to_grid_sample(flat)
        u = sample(f, coords.to(f.dtype), "linear", "zeros")  # (N, D, P, 1[, 1])
        u = u.reshape(f.shape[0], self.ndim, -1).transpose(1, 2).reshape(points.shape)
        return points + u.to(points.dtype)

    def resampled(self, grid: Grid) -> DisplacementField:
        """The same world-space field on another ``grid`` (linear interpolation of the mm
        vectors, zero outside this field's grid), in voxel units of ``grid``. Also moves
        velocity fields between grids, since they transform the same way."""
        if grid.ndim != self.ndim:
            raise ValueError(f"resampled: a {self.ndim}D field cannot move to a {grid.ndim}D grid")
        with torch.no_grad():
            pts = grid.world_points(torch.float32, self.field.device).unsqueeze(0)
            pts = pts.expand(self.field.shape[0], *pts.shape[1:])
            u = self(pts) - pts
        return DisplacementField.from_world(grid, u.movedim(-1, 1))

    def inverse(self, iterations: int = 50, tolerance: float = 1e-3) -> DisplacementField:
        """Iterative inverse on the same grid (see :func:`invert_displacement`).

        The field is extended by its border values while inverting, so the inverse is
        accurate inside the grid; check :func:`invert_displacement`'s residual when it matters.
        """
        inv = invert_displacement(self.voxel_field(), iterations, tolerance, "border")
        return DisplacementField(self.grid, inv.displacement)

    def compose(self, other: DisplacementField) -> DisplacementField:
        """``self ∘ other`` as one field: ``x ↦ self(other(x))``, ``other`` applied first.

        Both must live on the same grid; equals ``other.then(self)`` at the grid points
        (zero displacement outside the grid, as in :meth:`forward`).
        """
        if not self.grid.allclose(other.grid):
            raise ValueError(f"compose: grids differ ({self.grid} vs {other.grid})")
        w = compose_displacements(self.voxel_field(), other.voxel_field(), "zeros")
        return DisplacementField(self.grid, w)


def on_grid(own: Grid, field: torch.Tensor, grid: Grid, batch: int | None, generic) -> torch.Tensor:
    """A voxel-unit field ``(N, D, *S)`` living on ``own`` expressed on ``grid``: as is when the
    grids agree, by ``F.interpolate`` when ``grid`` is ``own.resized(...)`` (same first and last
    voxel centres), else by ``generic(grid, batch)`` (sampling at world points)."""
    if batch is not None and batch != field.shape[0]:
        if field.shape[0] != 1:
            return generic(grid, batch)
        field = field.expand(batch, *field.shape[1:])
    if grid.allclose(own):
        return field
    if grid.ndim == own.ndim and own.resized(grid.shape).allclose(grid):
        return resize_displacement(field, grid.shape)
    return generic(grid, batch)
