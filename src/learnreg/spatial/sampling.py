"""Differentiable sampling (the spatial-transformer sampler) and physical-space resampling."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from learnreg.core.grid import Grid
from learnreg.core.image import Image

if TYPE_CHECKING:
    from learnreg.spatial.base import SpatialTransform

__all__ = ["sample", "sample_index", "resample", "warp", "Interpolation", "Padding"]

Interpolation = Literal["linear", "nearest", "label"]
Padding = Literal["zeros", "border", "reflection"]
_MODES = ("linear", "nearest", "label")
_PADDINGS = ("zeros", "border", "reflection")


def _check_options(mode: str, padding: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"interpolation must be one of {_MODES}, got {mode!r}")
    if padding not in _PADDINGS:
        raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")


def sample(
    image: torch.Tensor,
    coords: torch.Tensor,
    mode: Interpolation = "linear",
    padding: Padding = "zeros",
) -> torch.Tensor:
    """Sample ``image (N, C, *S)`` at grid_sample coordinates ``coords (N, *T, D)``.

    ``coords`` are normalized (align_corners=True) in grid_sample's reversed (x, y, z) order,
    as produced by :meth:`Grid.world_to_grid_sample`. Returns ``(N, C, *T)``. ``mode='label'``
    warps integer label maps by one-hot linear interpolation and argmax.
    """
    _check_options(mode, padding)
    d = image.dim() - 2
    if d not in (2, 3) or coords.dim() != d + 2 or coords.shape[-1] != d:
        raise ValueError(
            f"sample: image {tuple(image.shape)} needs coords of shape (N, *T, {d}); "
            f"got {tuple(coords.shape)}"
        )
    if coords.shape[0] != image.shape[0]:
        if coords.shape[0] == 1:
            coords = coords.expand(image.shape[0], *coords.shape[1:])
        elif image.shape[0] == 1:
            image = image.expand(coords.shape[0], *image.shape[1:])
        else:
            raise ValueError(f"sample: batch sizes differ ({image.shape[0]} vs {coords.shape[0]})")
    if mode == "label":
        return _sample_labels(image, coords, padding)
    coords = coords.to(image.dtype) if image.is_floating_point() else coords
    src = image if image.is_floating_point() else image.float()
    out = _grid_sample(
        src, coords.to(src.dtype), "bilinear" if mode == "linear" else "nearest", padding
    )
    return out if image.is_floating_point() else out.round().to(image.dtype)


def _grid_sample(src: torch.Tensor, coords: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """``F.grid_sample`` (align_corners=True) that also respects axes of size 1.

    grid_sample maps every coordinate of a size-1 axis onto its only slice; with zero
    padding we fade to zero off the slice instead (linear: ``1 - |i|``, nearest: ``|i| ≤ ½``).
    """
    out = F.grid_sample(src, coords, mode=mode, padding_mode=padding, align_corners=True)
    d = src.dim() - 2
    if padding != "zeros" or all(s > 1 for s in src.shape[2:]):
        return out
    for axis, size in enumerate(src.shape[2:]):
        if size == 1:
            off = coords[..., d - 1 - axis].abs().unsqueeze(1)
            w = (1 - off).clamp(min=0) if mode == "bilinear" else (off <= 0.5).to(out.dtype)
            out = out * w.to(out.dtype)
    return out


def _sample_labels(labels: torch.Tensor, coords: torch.Tensor, padding: str) -> torch.Tensor:
    """One-hot linear interpolation then argmax, one label at a time to bound memory."""
    if labels.shape[1] != 1:
        raise ValueError(f"label maps must have one channel, got {labels.shape[1]}")
    values = torch.unique(labels)
    coords = coords.float()
    ones = torch.ones_like(labels[:, :1], dtype=torch.float32)
    inside = _grid_sample(ones, coords, "bilinear", padding)
    # outside the moving image is background (0) with the weight that lies outside
    best = 1.0 - inside
    out = torch.zeros(best.shape, dtype=labels.dtype, device=labels.device)
    for v in values:
        onehot = (labels == v).float()
        p = _grid_sample(onehot, coords, "bilinear", padding)
        if v == 0:
            p = p + best
        take = p > best
        best = torch.where(take, p, best)
        out = torch.where(take, v.to(out.dtype), out)
    return out


def sample_index(
    image: torch.Tensor,
    index_points: torch.Tensor,
    mode: Interpolation = "linear",
    padding: Padding = "zeros",
) -> torch.Tensor:
    """Sample ``image (N, C, *S)`` at voxel-index points ``(N, *T, D)`` of its own grid."""
    g = Grid(tuple(image.shape[2:]))
    return sample(image, g.index_to_grid_sample(index_points), mode, padding)


def warp(
    image: torch.Tensor,
    displacement: torch.Tensor,
    mode: Interpolation = "linear",
    padding: Padding = "zeros",
) -> torch.Tensor:
    """Warp ``image (N, C, *S)`` by a displacement ``(N, D, *S)`` in voxel units of that grid.

    ``out(x) = image(x + u(x))``: the spatial transformer of VoxelMorph and friends.
    """
    d = image.dim() - 2
    if displacement.shape[1] != d or tuple(displacement.shape[2:]) != tuple(image.shape[2:]):
        raise ValueError(
            f"warp: displacement {tuple(displacement.shape)} must be (N, {d}, "
            f"{', '.join(map(str, image.shape[2:]))})"
        )
    g = Grid(tuple(image.shape[2:]))
    ident = g.index_points(displacement.dtype, displacement.device)
    pts = ident + displacement.movedim(1, -1)
    return sample(image, g.index_to_grid_sample(pts), mode, padding)


def resample(
    image: Image,
    grid: Grid,
    transform: SpatialTransform | None = None,
    mode: Interpolation = "linear",
    padding: Padding = "zeros",
) -> Image:
    """Resample ``image`` onto ``grid`` in physical space, through an optional transform.

    ``transform`` maps points of ``grid``'s world space to ``image``'s world space (fixed to
    moving, ITK convention); without it the two are related by identity in world space.
    """
    if image.ndim != grid.ndim:
        raise ValueError(
            f"{image.name}: cannot resample a {image.ndim}D image onto a {grid.ndim}D grid"
        )
    pts = grid.world_points(torch.float64, image.data.device).unsqueeze(0)
    if transform is not None:
        pts = transform(pts.float()).double()
    coords = image.grid.world_to_grid_sample(pts).float()
    out = sample(image.batch(), coords, mode, padding)[0]
    return Image(out, grid, image.name)
