"""Cubic B-spline free-form deformations (FFD) on a grid.

Control point ``k`` along index axis ``a`` sits at voxel index ``(k - 1) * s_a`` (``s_a`` the
integer control spacing): the control lattice covers the grid with one extra point outside
each border, as in ITK and deepali, so ``C_a = ceil((n_a - 1) / s_a) + 3`` points per axis.
The displacement in voxel units of the grid is ``u(x) = Σ_k c_k Π_a B((x_a - (k_a - 1) s_a) / s_a)``
with the cubic B-spline ``B``; it is evaluated on the whole grid by one strided transposed
convolution per axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from learnreg.core.grid import Grid
from learnreg.spatial.base import SpatialTransform
from learnreg.spatial.displacement import DisplacementField, on_grid
from learnreg.spatial.fields import check_field

__all__ = ["BSplineTransform", "bspline_kernel", "control_lattice_shape", "evaluate_bspline"]


def bspline_kernel(
    spacing: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Cubic B-spline ``B(j / spacing)`` for ``j = -(2 s - 1) .. 2 s - 1`` (length ``4 s - 1``)."""
    s = int(spacing)
    if s < 1:
        raise ValueError(f"bspline_kernel: spacing must be a positive integer, got {spacing}")
    t = (torch.arange(-2 * s + 1, 2 * s, dtype=torch.float64) / s).abs()
    b = torch.where(t < 1, 2 / 3 - t**2 + t**3 / 2, (2 - t) ** 3 / 6)
    return b.to(dtype=dtype, device=device)


def control_lattice_shape(shape: Sequence[int], spacing: Sequence[int]) -> tuple[int, ...]:
    """Control lattice size covering a grid of ``shape`` with the given integer spacing."""
    return tuple(math.ceil((n - 1) / s) + 3 for n, s in zip(shape, spacing, strict=True))


def evaluate_bspline(
    params: torch.Tensor, spacing: Sequence[int], shape: Sequence[int]
) -> torch.Tensor:
    """Dense field ``(N, C, *shape)`` from control coefficients ``(N, C, *control)``."""
    d = len(shape)
    n, c = params.shape[:2]
    x = params.reshape(n * c, 1, *params.shape[2:])
    conv = F.conv_transpose2d if d == 2 else F.conv_transpose3d
    for a, (s, size) in enumerate(zip(spacing, shape, strict=True)):
        w = bspline_kernel(s, params.dtype, params.device)
        view = [1] * d
        view[a] = -1
        stride = [1] * d
        stride[a] = s
        x = conv(x, w.view(1, 1, *view), stride=stride)
        x = x.narrow(a + 2, 3 * s - 1, size)  # output m = x + 3 s - 1 (see module doc)
    return x.reshape(n, c, *shape)


class BSplineTransform(SpatialTransform):
    """Cubic B-spline FFD ``x ↦ x + u(x)`` on ``grid``; coefficients in voxel units of ``grid``.

    Args:
        grid: the (fixed) grid the displacement lives on.
        control_spacing: integer spacing of control points in voxels (one or per axis).
        params: coefficients ``(N, D, *C)``; without ``control_spacing`` the spacing is
            inferred from ``C``. Default zeros (the identity) of :func:`control_lattice_shape`.
        control_shape: lattice size ``C`` instead of ``control_spacing``.
        learnable: make the coefficients an ``nn.Parameter``.
    """

    def __init__(
        self,
        grid: Grid,
        control_spacing: int | Sequence[int] | None = None,
        params: torch.Tensor | None = None,
        *,
        control_shape: Sequence[int] | None = None,
        batch: int = 1,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.ndim = d = grid.ndim
        if control_shape is None and params is not None:
            check_field(params, "B-spline params")
            control_shape = tuple(params.shape[2:])
        if control_spacing is not None:
            sp = (
                [int(control_spacing)] * d
                if isinstance(control_spacing, int)
                else list(control_spacing)
            )
        elif control_shape is not None:
            sp = [
                max(1, math.ceil((n - 1) / max(c - 3, 1)))
                for n, c in zip(grid.shape, control_shape, strict=True)
            ]
        else:
            raise ValueError("BSplineTransform needs control_spacing, control_shape or params")
        if len(sp) != d or any(s < 1 for s in sp):
            raise ValueError(f"control_spacing must be {d} positive integers, got {sp}")
        cshape = control_lattice_shape(grid.shape, sp)
        if control_shape is not None and tuple(control_shape) != cshape:
            raise ValueError(
                f"control lattice {tuple(control_shape)} does not cover grid {grid.shape} with "
                f"one extra point per border at an integer spacing (spacing {sp} needs {cshape})"
            )
        if params is None:
            params = torch.zeros(batch, d, *cshape)
        if params.dim() != d + 2 or params.shape[1] != d or tuple(params.shape[2:]) != cshape:
            raise ValueError(
                f"B-spline params must be (N, {d}, *{cshape}); got {tuple(params.shape)}"
            )
        self.control_spacing = tuple(sp)
        self._register_tensor("params", params, learnable)

    @property
    def control_shape(self) -> tuple[int, ...]:
        return tuple(self.params.shape[2:])

    def voxel_field(self) -> torch.Tensor:
        """Dense displacement ``(N, D, *S)`` in voxel units of :attr:`grid`."""
        return evaluate_bspline(self.params, self.control_spacing, self.grid.shape)

    def displacement_field(self) -> DisplacementField:
        return DisplacementField(self.grid, self.voxel_field())

    def voxel_displacement(self, grid: Grid, batch: int | None = None) -> torch.Tensor:
        """The dense B-spline field on its grid, expressed on ``grid``."""
        return on_grid(self.grid, self.voxel_field(), grid, batch, super().voxel_displacement)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.displacement_field()(points)

    def inverse(self) -> DisplacementField:
        """Iterative inverse as a dense field (see :meth:`DisplacementField.inverse`)."""
        return self.displacement_field().inverse()
