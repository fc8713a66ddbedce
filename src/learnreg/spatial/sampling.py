"""Differentiable sampling (the spatial-transformer sampler) and physical-space resampling."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from learnreg.core.grid import Grid, sampling_frames
from learnreg.core.image import Image
from learnreg.core.options import check_option
from learnreg.spatial.separable import separable_resample

if TYPE_CHECKING:
    from learnreg.spatial.base import SpatialTransform
    from learnreg.spatial.displacement import DisplacementField

__all__ = [
    "sample",
    "sample_index",
    "resample",
    "regular_coords",
    "warp",
    "displaced_grid_sample_coords",
    "Interpolation",
    "Padding",
]

Interpolation = Literal["linear", "nearest", "label"]
Padding = Literal["zeros", "border", "reflection"]
_MODES = ("linear", "nearest", "label")
_PADDINGS = ("zeros", "border", "reflection")


def _check_options(mode: str, padding: str) -> None:
    check_option("interpolation", mode, _MODES)
    check_option("padding", padding, _PADDINGS)


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


# below this many output points a single image is sampled on one thread
_PARALLEL_MIN_POINTS = 1 << 15


def _grid_sample_threads(
    src: torch.Tensor, coords: torch.Tensor, mode: str, padding: str
) -> torch.Tensor:
    """``F.grid_sample(src, coords, align_corners=True)``, on all intra-op threads for N = 1.

    PyTorch's CPU grid_sample kernels parallelize over the batch only, so one image runs on
    one thread. For N = 1 on CPU the output points are split into ``k`` equal chunks (``k``
    the thread count, or the largest common divisor with the number of points) and sampled
    as a batch of ``k`` stride-0 views of the same image: every output value is computed
    exactly as before (bitwise), ``k`` at a time. Backward works through the same kernels.
    """
    n_points = coords[0, ..., 0].numel()
    k = math.gcd(torch.get_num_threads(), n_points)
    if (
        k < 2
        or src.device.type != "cpu"
        or src.shape[0] != 1
        or coords.shape[0] != 1
        or n_points < _PARALLEL_MIN_POINTS
    ):
        return F.grid_sample(src, coords, mode=mode, padding_mode=padding, align_corners=True)
    d = src.dim() - 2
    c = src.shape[1]
    chunks = coords.reshape(k, n_points // k, *([1] * (d - 1)), d)
    out = F.grid_sample(
        src.expand(k, *src.shape[1:]), chunks, mode=mode, padding_mode=padding, align_corners=True
    )
    out = out.reshape(k, c, n_points // k).transpose(0, 1)
    return out.reshape(1, c, *coords.shape[1:-1])


def _grid_sample(src: torch.Tensor, coords: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """``F.grid_sample`` (align_corners=True) that also respects axes of size 1.

    grid_sample maps every coordinate of a size-1 axis onto its only slice; with zero
    padding we fade to zero off the slice instead (linear: ``1 - |i|``, nearest: ``|i| ≤ ½``).
    """
    out = _grid_sample_threads(src, coords, mode, padding)
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
    return sample(image, displaced_grid_sample_coords(displacement), mode, padding)


def displaced_grid_sample_coords(displacement: torch.Tensor) -> torch.Tensor:
    """grid_sample coordinates ``(N, *S, D)`` of the points ``x + u(x)`` of a displacement
    ``(N, D, *S)`` in voxel units of its grid (``Grid.index_to_grid_sample`` of them).

    Computed axis by axis as ``(u_d + i_d) · 2/(S_d − 1) − 1`` (axes of size 1 keep the
    index), the same float operations as the matrix product, without building the
    identity grid or multiplying by zeros.
    """
    d = displacement.dim() - 2
    shape = tuple(displacement.shape[2:])
    m = Grid(shape).index_to_normalized
    columns = []
    for axis in reversed(range(d)):  # grid_sample's (x, y, z) order
        index = torch.arange(shape[axis], dtype=displacement.dtype, device=displacement.device)
        index = index.view(shape[axis], *([1] * (d - 1 - axis)))
        x = displacement[:, axis] + index
        if m[axis, axis] != 1.0 or m[axis, d] != 0.0:
            x = x.mul_(float(m[axis, axis])).add_(float(m[axis, d]))
        columns.append(x)
    return torch.stack(columns, dim=-1)


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
    if mode == "linear" and padding == "zeros" and image.data.is_floating_point():
        parts = _registration_parts(grid, transform)
        if parts is not None and parts[0] is None and not parts[1].requires_grad:
            out = separable_resample(image.batch(), grid, image.grid, parts[1].numpy())
            if out is not None:
                return Image(out[0], grid, image.name)
    coords = regular_coords(grid, image.grid, transform, image.data.device)
    if coords is None:
        pts = grid.world_points(torch.float64, image.data.device).unsqueeze(0)
        if transform is not None:
            pts = transform(pts.float()).double()
        coords = image.grid.world_to_grid_sample(pts).float()
    out = sample(image.batch(), coords, mode, padding)[0]
    return Image(out, grid, image.name)


def _registration_parts(
    grid: Grid, transform: SpatialTransform | None
) -> tuple[DisplacementField | None, torch.Tensor] | None:
    """``transform`` as (a displacement field on ``grid`` or None, one homogeneous world
    matrix, float64) when it is none, affines, or such a field followed by affines (batch 1);
    None otherwise."""
    from learnreg.spatial.affine import AffineTransform
    from learnreg.spatial.base import TransformChain
    from learnreg.spatial.displacement import DisplacementField

    if transform is None:
        parts = []
    elif isinstance(transform, TransformChain):
        parts = list(transform.transforms)
    else:
        parts = [transform]
    field = parts.pop(0) if parts and isinstance(parts[0], DisplacementField) else None
    if field is not None and (not field.grid.allclose(grid) or field.voxel_field().shape[0] != 1):
        return None
    matrix = torch.eye(grid.ndim + 1, dtype=torch.float64)
    for t in parts:
        if not isinstance(t, AffineTransform) or t.homogeneous().shape[0] != 1:
            return None
        matrix = t.homogeneous()[0].double().cpu() @ matrix
    return field, matrix


def regular_coords(
    grid: Grid, source: Grid, transform: SpatialTransform | None, device: torch.device
) -> torch.Tensor | None:
    """Sampling coordinates of ``grid``'s voxels in ``source`` for the transforms a
    registration applies — none, one affine, or a displacement on ``grid`` then an affine
    (:class:`~learnreg.spatial.result.RegistrationResult`) — from ``F.affine_grid`` plus
    the displacement mapped linearly (3× faster than mapping world points on a 1 mm brain);
    None for any other transform."""
    parts = _registration_parts(grid, transform)
    if parts is None:
        return None
    field, matrix = parts
    d = grid.ndim
    to_world, to_sample = sampling_frames(grid, source)
    theta = to_sample @ matrix @ to_world
    coords = F.affine_grid(theta[None, :-1].float(), (1, 1, *grid.shape), align_corners=True)
    if field is not None:  # voxel displacement → source normalized (x, y, z) offsets
        lin = (to_sample @ matrix)[:d, :d] @ torch.from_numpy(grid.affine[:d, :d])
        u = field.voxel_field()[0].to(torch.float32).movedim(0, -1)
        coords = coords + (u @ lin.T.float())[None]
    return coords.to(device)
