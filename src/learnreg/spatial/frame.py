"""Transforms that networks predict in the index coordinates of their grid, in world space.

A network sees a pair on its network grid (:class:`~learnreg.core.Grid`) and often thinks in
that grid's voxel indices: an affine about the grid centre, corner offsets of a homography,
control-point displacements of a thin-plate spline. A transform ``T_idx`` of index points is
the world transform ``x ↦ G(T_idx(G⁻¹(x)))`` with ``G`` the grid's index-to-world map; that
conjugation is the only bridge needed, and it lives here:

- linear and projective maps fold it into their matrix (:func:`index_matrix_to_world`,
  :func:`world_matrix_to_index`), so a learned affine stays an affine that ITK reads;
- any other index-space transform is wrapped as a :class:`GridFrame`.
"""

from __future__ import annotations

import torch

from learnreg.core.grid import Grid
from learnreg.spatial.base import SpatialTransform
from learnreg.spatial.displacement import DisplacementField

__all__ = ["GridFrame", "index_matrix_to_world", "world_matrix_to_index"]


def _grid_affine(
    grid: Grid, matrix: torch.Tensor, caller: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grid``'s index → world matrix and its inverse (float64, on ``matrix``'s device), after
    checking that ``matrix`` is ``(N, D+1, D+1)`` for the grid's ``D``."""
    d = grid.ndim
    if matrix.dim() != 3 or matrix.shape[1:] != (d + 1, d + 1):
        raise ValueError(
            f"{caller}: a {d}D grid needs (N, {d + 1}, {d + 1}) matrices; got {tuple(matrix.shape)}"
        )
    a = torch.as_tensor(grid.affine, dtype=torch.float64, device=matrix.device)
    return a, torch.linalg.inv(a)


def index_matrix_to_world(matrix: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``G M G⁻¹``: homogeneous matrices ``(N, D+1, D+1)`` of index points of ``grid`` as
    matrices of world points (affine or projective alike). Differentiable; the product is
    formed in float64 and returned in ``matrix``'s dtype."""
    a, a_inv = _grid_affine(grid, matrix, "index_matrix_to_world")
    return (a @ matrix.double() @ a_inv).to(matrix.dtype)


def world_matrix_to_index(matrix: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``G⁻¹ M G``: the inverse of :func:`index_matrix_to_world`."""
    a, a_inv = _grid_affine(grid, matrix, "world_matrix_to_index")
    return (a_inv @ matrix.double() @ a).to(matrix.dtype)


class GridFrame(SpatialTransform):
    """``x ↦ G(T(G⁻¹ x))``: a transform ``inner`` of ``grid``'s index points, on world points.

    Used for transforms a network defines in its grid's voxel indices that have no matrix
    form (e.g. a thin-plate spline through index-space control points). On ``grid`` itself,
    :meth:`voxel_displacement` is ``inner``'s displacement of index points, computed without
    a round trip through world coordinates.
    """

    def __init__(self, inner: SpatialTransform, grid: Grid) -> None:
        super().__init__()
        if inner.ndim != grid.ndim:
            raise ValueError(f"GridFrame: a {inner.ndim}D transform on a {grid.ndim}D grid")
        self.inner = inner
        self.grid = grid
        self.ndim = grid.ndim

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        idx = self.grid.world_to_index(points.double()).to(points.dtype)
        return self.grid.index_to_world(self.inner(idx).double()).to(points.dtype)

    def voxel_displacement(self, grid: Grid, batch: int | None = None) -> torch.Tensor:
        if grid.allclose(self.grid):
            return self.inner.voxel_displacement(Grid(grid.shape), batch)
        return super().voxel_displacement(grid, batch)

    def inverse(self) -> SpatialTransform:
        """The inner transform's inverse in the same frame where it has one; otherwise the
        iterative inverse of the dense displacement on :attr:`grid`."""
        try:
            return GridFrame(self.inner.inverse(), self.grid)
        except NotImplementedError:
            field = DisplacementField(self.grid, self.voxel_displacement(self.grid).detach())
            return field.inverse()
