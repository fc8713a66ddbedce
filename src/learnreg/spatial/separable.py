"""Linear resampling between axis-aligned grids as one small matrix per axis.

When every index axis of a target grid maps to one index axis of the source grid (a scale and
an offset: grids that differ in spacing, origin, flips or axis order, e.g. a network's RAS grid
and a 1 mm image grid), multilinear interpolation is separable: ``out = W₀ ×₀ W₁ ×₁ W₂ ×₂ x``
with a 2-banded ``(n_target, n_source)`` weight matrix per axis. This is the same value as
``grid_sample(..., align_corners=True, padding_mode="zeros")`` at the target's voxel centres
(a neighbour outside the source counts as zero), 3–5× faster when upsampling a coarse field
onto a 1 mm brain grid.
"""

from __future__ import annotations

import numpy as np
import torch

from learnreg.core.grid import Grid

__all__ = ["axis_map", "separable_resample", "apply_per_axis", "interpolation_weights"]

_TOLERANCE = 1e-6


def axis_map(
    target: Grid, source: Grid, matrix: np.ndarray | None = None
) -> list[tuple[int, float, float]] | None:
    """Per target axis ``k``: ``(source axis, scale, offset)`` with source index
    ``= scale · i_k + offset``, for target world → source world ``matrix`` (default the
    identity); None when some target axis does not map to a single source axis."""
    d = target.ndim
    world = np.eye(d + 1) if matrix is None else np.asarray(matrix, dtype=np.float64)
    m = source.inverse_affine @ world @ target.affine  # target index → source index
    lin = m[:d, :d]
    out = []
    for k in range(d):
        col = lin[:, k]
        p = int(np.argmax(np.abs(col)))
        if np.abs(np.delete(col, p)).max(initial=0.0) > _TOLERANCE * max(abs(col[p]), 1.0):
            return None
        out.append((p, float(col[p]), float(m[p, d])))
    if sorted(p for p, _, _ in out) != list(range(d)):
        return None
    return out


def interpolation_weights(n_out: int, n_in: int, scale: float, offset: float) -> torch.Tensor:
    """Linear-interpolation weights ``(n_out, n_in)`` at source indices ``scale·i + offset``;
    neighbours outside ``[0, n_in)`` are dropped (zero padding)."""
    x = scale * np.arange(n_out, dtype=np.float64) + offset
    x = np.where(np.abs(x - np.round(x)) < 1e-9, np.round(x), x)  # exact on coincident nodes
    i0 = np.floor(x).astype(np.int64)
    frac = x - i0
    w = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    for idx, weight in ((i0, 1.0 - frac), (i0 + 1, frac)):
        ok = (idx >= 0) & (idx < n_in) & (weight > 0)
        w[rows[ok], idx[ok]] += weight[ok]
    return torch.from_numpy(w)


def separable_resample(
    x: torch.Tensor, target: Grid, source: Grid, matrix: np.ndarray | None = None
) -> torch.Tensor | None:
    """``x (N, C, *source.shape)`` linearly resampled at ``target``'s voxel centres (mapped by
    the target world → source world ``matrix``; zero outside the source), ``(N, C,
    *target.shape)``; None when the grids are not axis-aligned (use ``grid_sample``)."""
    axes = axis_map(target, source, matrix)
    if axes is None:
        return None
    # put the source axes in target order, then interpolate one axis at a time
    out = x.permute(0, 1, *[2 + p for p, _, _ in axes])
    weights = [
        interpolation_weights(n, source.shape[p], scale, offset)
        for n, (p, scale, offset) in zip(target.shape, axes, strict=True)
    ]
    return apply_per_axis(out, weights)


def apply_per_axis(x: torch.Tensor, matrices: list[torch.Tensor]) -> torch.Tensor:
    """``x (N, C, *S)`` with one ``(n_out, S_k)`` matrix applied along each spatial axis
    ``k`` (the axes that shrink most first, so the larger products run on fewer voxels)."""
    order = sorted(range(len(matrices)), key=lambda k: matrices[k].shape[0] / matrices[k].shape[1])
    out = x
    for k in order:
        out = (out.movedim(2 + k, -1) @ matrices[k].to(out).T).movedim(-1, 2 + k)
    return out.contiguous()
