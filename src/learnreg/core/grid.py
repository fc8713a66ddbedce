"""Sampling grids in physical space: the one place where coordinate conventions are converted.

Conventions (see ARCHITECTURE.md):

- index space: array index order ``(i, j[, k])`` exactly as nibabel returns the data array;
- world space: RAS+ millimetres, ``world = origin + direction @ diag(spacing) @ index``;
- normalized space: ``grid_sample(..., align_corners=True)``, -1 and +1 are the centres of the
  first and last voxel, in *index* order; :func:`to_grid_sample` reverses it to grid_sample's
  ``(x, y[, z])`` order and is the only place that does so.

Point tensors are channels-last ``(..., D)``; dense fields are channels-first ``(N, D, *S)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Grid", "to_grid_sample", "apply_matrix", "sampling_frames"]


def apply_matrix(matrix: torch.Tensor | np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """Apply a homogeneous ``(D+1, D+1)`` (or batched ``(N, D+1, D+1)``) matrix to points.

    ``points`` is ``(..., D)``; a batched matrix needs points of shape ``(N, ..., D)``.
    """
    m = torch.as_tensor(matrix, dtype=points.dtype, device=points.device)
    d = points.shape[-1]
    lin, off = m[..., :d, :d], m[..., :d, d]
    if m.dim() == 2:
        return points @ lin.T + off
    n = m.shape[0]
    flat = points.reshape(n, -1, d)
    out = torch.bmm(flat, lin.transpose(1, 2)) + off[:, None, :]
    return out.reshape(points.shape)


def sampling_frames(target: Grid, source: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Homogeneous float64 matrices around a world-space affine ``A`` (target world → source
    world) such that ``to_sample @ A @ to_world`` maps the target grid's normalized coordinates
    to the source grid's, both in grid_sample's (x, y, z) order: ``F.affine_grid`` of its top
    rows gives every target voxel's sampling coordinates without a per-voxel point array."""
    d = target.ndim
    flip = np.eye(d + 1)
    flip[:d, :d] = np.eye(d)[::-1]
    to_world = target.affine @ np.linalg.inv(target.index_to_normalized) @ flip
    to_sample = flip @ source.world_to_normalized
    return torch.from_numpy(to_world), torch.from_numpy(to_sample)


def to_grid_sample(normalized: torch.Tensor) -> torch.Tensor:
    """Reorder normalized coordinates ``(..., D)`` from index order to grid_sample's x, y, z."""
    return normalized.flip(-1)


@dataclass(frozen=True)
class Grid:
    """A regular sampling grid placed in physical space.

    Args:
        shape: number of voxels along each index axis.
        spacing: voxel size in mm along each index axis (default 1).
        origin: world position (RAS mm) of the centre of voxel 0 (default 0).
        direction: ``(D, D)`` orthonormal direction cosines; column ``d`` is index axis ``d``.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...] = field(default=())
    origin: tuple[float, ...] = field(default=())
    direction: tuple[tuple[float, ...], ...] = field(default=())

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        d = len(shape)
        if d not in (2, 3):
            raise ValueError(f"Grid must be 2D or 3D, got shape {shape}")
        if any(s < 1 for s in shape):
            raise ValueError(f"Grid shape must be positive, got {shape}")
        spacing = tuple(float(s) for s in self.spacing) if len(self.spacing) else (1.0,) * d
        origin = tuple(float(o) for o in self.origin) if len(self.origin) else (0.0,) * d
        direction = (
            np.asarray(self.direction, dtype=np.float64) if len(self.direction) else np.eye(d)
        )
        if len(spacing) != d or len(origin) != d or direction.shape != (d, d):
            raise ValueError(
                f"Grid of shape {shape}: spacing {spacing}, origin {origin} and direction "
                f"{direction.shape} must all be {d}-dimensional"
            )
        if any(not np.isfinite(s) or s <= 0 for s in spacing):
            raise ValueError(f"Grid spacing must be positive and finite, got {spacing}")
        if not np.allclose(direction.T @ direction, np.eye(d), atol=1e-4):
            raise ValueError(f"Grid direction must be orthonormal, got {direction.tolist()}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", tuple(tuple(float(v) for v in r) for r in direction))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_affine(cls, shape: Sequence[int], affine: np.ndarray) -> Grid:
        """Grid from a homogeneous index-to-world (RAS) matrix, e.g. a NIfTI affine.

        Shear is not representable; it raises rather than being silently dropped.
        """
        a = np.asarray(affine, dtype=np.float64)
        d = len(shape)
        lin = a[:d, :d]
        spacing = np.linalg.norm(lin, axis=0)
        if np.any(spacing <= 0):
            raise ValueError(f"affine has a zero-length axis: {a.tolist()}")
        direction = lin / spacing
        if not np.allclose(direction.T @ direction, np.eye(d), atol=1e-3):
            raise ValueError(
                "affine has shear; only rotation, scaling and translation are supported"
            )
        # re-orthonormalize small rounding noise (nearest orthonormal matrix)
        u, _, vt = np.linalg.svd(direction)
        direction = u @ vt
        return cls(tuple(shape), tuple(spacing), tuple(a[:d, d]), tuple(map(tuple, direction)))

    # ------------------------------------------------------------------ basic properties
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def affine(self) -> np.ndarray:
        """Homogeneous index-to-world matrix ``(D+1, D+1)`` in RAS mm (float64)."""
        d = self.ndim
        m = np.eye(d + 1)
        m[:d, :d] = np.asarray(self.direction) @ np.diag(self.spacing)
        m[:d, d] = self.origin
        return m

    @property
    def inverse_affine(self) -> np.ndarray:
        """Homogeneous world-to-index matrix."""
        return np.linalg.inv(self.affine)

    @property
    def index_to_normalized(self) -> np.ndarray:
        """Homogeneous matrix from index to normalized (align_corners=True) coordinates.

        An axis of size 1 keeps its index as coordinate (0 on the slice); the sampler uses
        it to fade to the padding value off the slice, which grid_sample alone cannot do.
        """
        d = self.ndim
        m = np.eye(d + 1)
        for a, s in enumerate(self.shape):
            if s > 1:
                m[a, a] = 2.0 / (s - 1)
                m[a, d] = -1.0
        return m

    @property
    def world_to_normalized(self) -> np.ndarray:
        return self.index_to_normalized @ self.inverse_affine

    @property
    def center(self) -> tuple[float, ...]:
        """World position (RAS mm) of the centre of the voxel-centre box."""
        return tuple(self.affine[:-1] @ np.append((np.asarray(self.shape) - 1) / 2.0, 1.0))

    @property
    def index_center(self) -> tuple[float, ...]:
        """Index coordinates ``(S − 1) / 2`` of the centre of the voxel-centre box: the point
        index-space linear transforms of networks turn about."""
        return tuple((s - 1) / 2.0 for s in self.shape)

    @property
    def extent(self) -> tuple[float, ...]:
        """Physical length (mm) between the first and last voxel centres along each axis."""
        return tuple((s - 1) * sp for s, sp in zip(self.shape, self.spacing, strict=True))

    # ------------------------------------------------------------------ point maps
    def index_to_world(self, points: torch.Tensor) -> torch.Tensor:
        return apply_matrix(self.affine, points)

    def world_to_index(self, points: torch.Tensor) -> torch.Tensor:
        return apply_matrix(self.inverse_affine, points)

    def world_to_grid_sample(self, points: torch.Tensor) -> torch.Tensor:
        """World points ``(..., D)`` to grid_sample coordinates of this grid (x, y, z order)."""
        return to_grid_sample(apply_matrix(self.world_to_normalized, points))

    def index_to_grid_sample(self, points: torch.Tensor) -> torch.Tensor:
        return to_grid_sample(apply_matrix(self.index_to_normalized, points))

    def index_points(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Index coordinates of every voxel, channels-last ``(*S, D)``."""
        axes = [torch.arange(s, dtype=dtype, device=device) for s in self.shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)

    def index_lattice(
        self,
        counts: int | Sequence[int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A regular lattice of ``counts`` points per axis from the first to the last voxel
        centre (index coordinates, last axis fastest), ``(K, D)``: control grids of thin-plate
        splines and the point grids of transform-error losses."""
        k = (int(counts),) * self.ndim if isinstance(counts, int) else tuple(map(int, counts))
        if len(k) != self.ndim or any(c < 1 for c in k):
            raise ValueError(f"index_lattice: need {self.ndim} positive counts, got {counts!r}")
        axes = [
            torch.linspace(0, n - 1, c, dtype=dtype, device=device)
            if c > 1
            else torch.full((1,), (n - 1) / 2, dtype=dtype, device=device)
            for n, c in zip(self.shape, k, strict=True)
        ]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, self.ndim)

    def world_points(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """World (RAS mm) coordinates of every voxel centre, channels-last ``(*S, D)``.

        Built axis by axis (origin + i·a₀ + j·a₁ + k·a₂, float64): three times faster than
        multiplying every index by the matrix on a 1 mm brain grid."""
        a = torch.as_tensor(self.affine, dtype=torch.float64, device=device)
        d = self.ndim
        out = a[:d, d].expand(*self.shape, d).clone()
        for k, n in enumerate(self.shape):
            view = [1] * d
            view[k] = n
            idx = torch.arange(n, dtype=torch.float64, device=device).view(*view, 1)
            out += idx * a[:d, k]
        return out.to(dtype)

    # ------------------------------------------------------------------ vectors
    def index_vectors_to_world(self, vectors: torch.Tensor) -> torch.Tensor:
        """Displacements in voxel units (channels-last) to mm in world space."""
        lin = torch.as_tensor(self.affine[:-1, :-1], dtype=vectors.dtype, device=vectors.device)
        return vectors @ lin.T

    def world_vectors_to_index(self, vectors: torch.Tensor) -> torch.Tensor:
        lin = torch.as_tensor(
            self.inverse_affine[:-1, :-1], dtype=vectors.dtype, device=vectors.device
        )
        return vectors @ lin.T

    # ------------------------------------------------------------------ derived grids
    def resized(self, shape: Sequence[int]) -> Grid:
        """A grid with another shape whose first and last voxel centres are unchanged.

        This keeps normalized coordinates identical between the two grids, so fields move
        between them with ``F.interpolate(..., align_corners=True)``.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.ndim:
            raise ValueError(f"resized: expected {self.ndim} sizes, got {shape}")
        spacing = tuple(
            sp * (s - 1) / (n - 1) if n > 1 and s > 1 else sp
            for s, n, sp in zip(self.shape, shape, self.spacing, strict=True)
        )
        return Grid(shape, spacing, self.origin, self.direction)

    def downsampled(self, factor: float) -> Grid:
        """Grid with about ``1/factor`` as many voxels per axis (same voxel-centre extent)."""
        return self.resized([max(2, int(round((s - 1) / factor)) + 1) for s in self.shape])

    def allclose(self, other: Grid, atol: float = 1e-4) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": [list(r) for r in self.direction],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        return cls(
            tuple(d["shape"]),
            tuple(d["spacing"]),
            tuple(d["origin"]),
            tuple(map(tuple, d["direction"])),
        )
