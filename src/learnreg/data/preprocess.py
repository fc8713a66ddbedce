"""Preprocessing onto a *network grid*: reorientation, resampling, padding, normalization.

A network sees every image on a regular grid of fixed shape and spacing. Here that grid is a
:class:`~learnreg.core.Grid` placed in the same physical (RAS mm) space as the input images:

- **reorientation** — with ``orientation="RAS"`` the network grid's direction is the identity,
  so index axis ``d`` runs along world axis ``d`` (R, A, S), whatever the input's storage order;
  ``orientation="native"`` keeps the reference image's direction cosines;
- **resampling** — images are resampled *in physical space* (:func:`learnreg.spatial.resample`)
  onto that grid, with a Gaussian anti-aliasing blur when the spacing grows;
- **crop/pad** — the grid is centred on the reference image's field of view and its shape is
  rounded up to a multiple of ``2**levels`` (what a U-Net with ``levels`` poolings needs);
- **intensity normalization** — percentile min-max to ``[0, 1]`` (values clipped).

Because nothing but that grid is applied, nothing else needs recording: the network grid
*is* the record. A displacement predicted by a network on it, ``(N, D, *S)`` in voxel units of
the network grid, is a fixed→moving transform in world space once wrapped as
:class:`~learnreg.spatial.DisplacementField` on the network grid (:func:`to_physical`). It
then applies to the **original** images::

    field = to_physical(output.displacement, net_grid)            # world → world transform
    warped = resample(moving_original, fixed_original.grid, field)  # full-resolution warp
    mm = field.displacement(fixed_original.grid)                    # (N, D, *S_fixed) in mm

``resample`` evaluates the field (linearly interpolated, zero outside the network grid) at the
world position of every voxel of the fixed image's grid and samples the moving image there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.core.options import check_option
from learnreg.spatial.base import SpatialTransform
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.filters import gaussian_blur
from learnreg.spatial.sampling import resample

__all__ = [
    "NetworkGrid",
    "Preprocessor",
    "ORIENTATIONS",
    "normalize_intensity",
    "sample_labels_index",
    "to_physical",
    "world_bounding_box",
]

ORIENTATIONS = ("RAS", "native")


def world_bounding_box(grid: Grid, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max corner of ``grid``'s field of view (voxel *edges*) in the frame ``direction``.

    Coordinates are ``direction.T @ world``, i.e. along the columns of ``direction``.
    """
    d = grid.ndim
    corners = np.array(np.meshgrid(*[(-0.5, s - 0.5) for s in grid.shape], indexing="ij"))
    corners = corners.reshape(d, -1).T  # (2**d, d) index coordinates
    world = corners @ grid.affine[:d, :d].T + grid.affine[:d, d]
    local = world @ direction  # coordinates along the direction columns
    return local.min(0), local.max(0)


@dataclass(frozen=True)
class NetworkGrid:
    """How the network grid is derived from a reference image's grid.

    Args:
        shape: voxels per axis; ``None``: field of view / spacing.
        spacing: mm per voxel; ``None``: field of view / shape, or the reference's spacing
            (permuted onto the network axes) when ``shape`` is ``None`` too.
        orientation: ``"RAS"`` (identity direction) or ``"native"`` (the reference's).
        levels: the shape is rounded up to a multiple of ``2**levels`` by padding.
    """

    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    orientation: str = "RAS"
    levels: int = 0

    def __post_init__(self) -> None:
        check_option("orientation", self.orientation, ORIENTATIONS)
        if self.levels < 0:
            raise ValueError(f"levels must be >= 0, got {self.levels}")
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
            if any(s < 1 for s in self.shape):
                raise ValueError(f"shape must be positive, got {self.shape}")
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
            if any(not math.isfinite(s) or s <= 0 for s in self.spacing):
                raise ValueError(f"spacing must be positive, got {self.spacing}")

    def grid_for(self, reference: Grid) -> Grid:
        """The network grid covering ``reference``'s field of view, centred on it."""
        d = reference.ndim
        for name, v in (("shape", self.shape), ("spacing", self.spacing)):
            if v is not None and len(v) != d:
                raise ValueError(f"network {name} {v} does not match a {d}D image")
        direction = np.eye(d) if self.orientation == "RAS" else np.asarray(reference.direction)
        lo, hi = world_bounding_box(reference, direction)
        fov = hi - lo
        if self.spacing is not None:
            spacing = np.asarray(self.spacing)
        elif self.shape is not None:
            spacing = fov / np.asarray(self.shape)
        else:  # reference spacing along the network axes (nearest reference axis)
            lin = np.abs(direction.T @ np.asarray(reference.direction))  # (net, ref)
            spacing = np.asarray(reference.spacing)[lin.argmax(1)]
        if self.shape is not None:
            shape = np.asarray(self.shape)
        else:
            shape = np.maximum(1, np.round(fov / spacing - 1e-6)).astype(int)
        m = 2**self.levels
        shape = (np.ceil(shape / m) * m).astype(int)
        centre = (lo + hi) / 2  # in direction coordinates
        origin_local = centre - (shape - 1) / 2 * spacing
        origin = direction @ origin_local
        return Grid(
            tuple(int(s) for s in shape),
            tuple(float(s) for s in spacing),
            tuple(float(o) for o in origin),
            tuple(map(tuple, direction)),
        )

    def to_dict(self) -> dict:
        return {
            "shape": None if self.shape is None else list(self.shape),
            "spacing": None if self.spacing is None else list(self.spacing),
            "orientation": self.orientation,
            "levels": self.levels,
        }


def normalize_intensity(
    data: torch.Tensor, percentiles: Sequence[float] = (1.0, 99.0), max_samples: int = 2_000_000
) -> torch.Tensor:
    """Percentile min-max normalization to ``[0, 1]`` (clipped); float32 out.

    Percentiles are estimated on at most ``max_samples`` voxels (a regular stride). A constant
    image becomes zeros.
    """
    x = data.detach().to(torch.float32)
    flat = x.reshape(-1).cpu().numpy()
    stride = max(1, flat.size // max_samples)
    lo, hi = np.percentile(flat[::stride], [float(percentiles[0]), float(percentiles[1])])
    if not hi > lo:
        return torch.zeros_like(x)
    return ((x - float(lo)) / float(hi - lo)).clamp(0.0, 1.0)


class Preprocessor:
    """Maps images and label maps onto a network grid, and network displacements back.

    Args:
        network: how the network grid is derived (:class:`NetworkGrid`).
        percentiles: intensity percentiles mapped to 0 and 1; ``None`` disables normalization.
        antialias: Gaussian blur (σ = (factor − 1)/2 voxels) before downsampling images.
    """

    def __init__(
        self,
        network: NetworkGrid | None = None,
        percentiles: Sequence[float] | None = (1.0, 99.0),
        antialias: bool = True,
    ) -> None:
        self.network = network or NetworkGrid()
        if percentiles is not None:
            p = tuple(float(v) for v in percentiles)
            if len(p) != 2 or not 0 <= p[0] < p[1] <= 100:
                raise ValueError(f"percentiles must be (low, high) in [0, 100], got {percentiles}")
            percentiles = p
        self.percentiles = percentiles
        self.antialias = antialias

    def grid_for(self, reference: Image | Grid) -> Grid:
        """The network grid for a reference image (usually the fixed image or the atlas)."""
        return self.network.grid_for(reference.grid if isinstance(reference, Image) else reference)

    def image(
        self, image: Image, grid: Grid | None = None, transform: SpatialTransform | None = None
    ) -> Image:
        """Normalize ``image`` and resample it onto ``grid`` (default: its own network grid).

        ``transform`` (grid world → image world, e.g. an affine pre-alignment) is applied in
        the same resampling. Returns a float32 ``Image`` of one channel on ``grid``; outside
        the input's field of view the value is 0 (after normalization, i.e. the low percentile).
        """
        grid = self.grid_for(image) if grid is None else grid
        data = image.data.to(torch.float32)
        if data.shape[0] != 1:
            raise ValueError(f"{image.name}: expected one channel, got {data.shape[0]}")
        if self.percentiles is not None:
            data = normalize_intensity(data, self.percentiles)
        src = Image(data, image.grid, image.name)
        if self.antialias:
            sigma = self._antialias_sigma(image.grid, grid)
            if any(s > 0 for s in sigma):
                src = src.with_data(gaussian_blur(data.unsqueeze(0), sigma)[0])
        return resample(src, grid, transform, mode="linear", padding="zeros")

    def labels(self, labels: Image, grid: Grid, transform: SpatialTransform | None = None) -> Image:
        """Resample a label map onto ``grid`` label-safely (one-hot linear + argmax), through
        an optional ``transform`` (grid world → label world); int64."""
        lab = labels.data
        if lab.is_floating_point():
            lab = lab.round()
        lab = lab.to(torch.int64)
        if lab.shape[0] != 1:
            raise ValueError(f"{labels.name}: label maps must have one channel")
        world = grid.world_points(torch.float64, lab.device)
        if transform is not None:
            with torch.no_grad():
                shape = world.shape
                world = transform(world.reshape(1, -1, grid.ndim).float()).double().reshape(shape)
        idx = labels.grid.world_to_index(world).unsqueeze(0)
        return Image(sample_labels_index(lab.unsqueeze(0), idx)[0], grid, labels.name)

    @staticmethod
    def _antialias_sigma(source: Grid, target: Grid) -> list[float]:
        """σ per source axis (voxels): (factor − 1)/2 where the target is coarser."""
        # spacing of the target along each source axis: project target voxel extents
        lin_t = np.asarray(target.direction) @ np.diag(target.spacing)
        along = np.abs(np.asarray(source.direction).T @ lin_t).max(1)
        factor = along / np.asarray(source.spacing)
        return [max(0.0, (f - 1.0) / 2.0) for f in factor]

    def to_physical(self, displacement: torch.Tensor, grid: Grid) -> DisplacementField:
        """See :func:`to_physical`."""
        return to_physical(displacement, grid)

    def to_dict(self) -> dict:
        return {
            "network": self.network.to_dict(),
            "percentiles": None if self.percentiles is None else list(self.percentiles),
            "antialias": self.antialias,
        }


def sample_labels_index(labels: torch.Tensor, index_points: torch.Tensor) -> torch.Tensor:
    """Label-safe sampling of ``labels (N, 1, *S)`` at index points ``(N, *T, D)``.

    The same result as one-hot linear interpolation and argmax (``sample(..., mode="label")``)
    but computed from the ``2**D`` neighbours of each point only, so its cost does not grow
    with the number of labels. Weight falling outside the image counts as background (0).
    Returns ``(N, 1, *T)`` in the labels' dtype.
    """
    n, d = labels.shape[0], labels.dim() - 2
    if labels.shape[1] != 1 or index_points.shape[-1] != d or index_points.shape[0] != n:
        raise ValueError(
            f"sample_labels_index: labels {tuple(labels.shape)} need points (N, *T, {d}), "
            f"got {tuple(index_points.shape)}"
        )
    shape = labels.shape[2:]
    out_shape = index_points.shape[1:-1]
    pts = index_points.reshape(n, -1, d).to(torch.float64)
    base = pts.floor()
    frac = pts - base
    base = base.to(torch.int64)
    flat = labels.reshape(n, -1)
    strides = [math.prod(shape[a + 1 :]) for a in range(d)]
    corner_labels, corner_weights = [], []
    for corner in range(2**d):
        bits = [(corner >> a) & 1 for a in range(d)]
        w = torch.ones_like(frac[..., 0])
        lin = torch.zeros_like(base[..., 0])
        inside = torch.ones_like(w, dtype=torch.bool)
        for a, b in enumerate(bits):
            i = base[..., a] + b
            w = w * (frac[..., a] if b else 1 - frac[..., a])
            inside &= (i >= 0) & (i < shape[a])
            lin = lin + i.clamp(0, shape[a] - 1) * strides[a]
        lab = torch.gather(flat, 1, lin)
        corner_labels.append(torch.where(inside, lab, torch.zeros_like(lab)))
        corner_weights.append(w)
    lab = torch.stack(corner_labels, -1)  # (N, P, 2**D)
    w = torch.stack(corner_weights, -1)
    score = ((lab.unsqueeze(-1) == lab.unsqueeze(-2)) * w.unsqueeze(-2)).sum(-1)
    # prefer background on ties, as the one-hot sampler does (background is scored first)
    score = score + 1e-9 * (lab == 0)
    best = score.argmax(-1, keepdim=True)
    out = torch.gather(lab, -1, best)[..., 0]
    return out.reshape(n, 1, *out_shape)


def to_physical(displacement: torch.Tensor, grid: Grid) -> DisplacementField:
    """A network-grid displacement ``(N, D, *S)`` (voxel units) as a world-space transform.

    The result maps fixed world points to moving world points (zero displacement outside the
    network grid); use it with :func:`learnreg.spatial.resample` on the *original* fixed grid
    to warp the original moving image, or ``.displacement(fixed_grid)`` for the field in mm.
    """
    if displacement.dim() != grid.ndim + 2 or tuple(displacement.shape[2:]) != grid.shape:
        raise ValueError(
            f"displacement {tuple(displacement.shape)} does not live on the network grid "
            f"(expected (N, {grid.ndim}, *{grid.shape}))"
        )
    return DisplacementField(grid, displacement)
