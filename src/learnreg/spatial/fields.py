"""Operations on dense displacement fields ``(N, D, *S)`` in voxel units of one grid.

A displacement ``u`` stands for the map ``x ↦ x + u(x)`` of index points of its grid (channel
``d`` along index axis ``d``). Values between voxel centres are linearly interpolated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from learnreg.spatial.sampling import Padding, warp

__all__ = [
    "FieldInverse",
    "check_field",
    "compose_displacements",
    "invert_displacement",
    "resize_displacement",
    "resize_linear",
]


def check_field(u: torch.Tensor, name: str = "displacement") -> int:
    """Raise unless ``u`` is ``(N, D, *S)`` with ``D`` = 2 or 3 spatial dims; return ``D``."""
    d = u.dim() - 2
    if d not in (2, 3) or u.shape[1] != d:
        raise ValueError(f"{name} must be (N, D, *S) with D = 2 or 3; got {tuple(u.shape)}")
    return d


def compose_displacements(
    u: torch.Tensor, v: torch.Tensor, padding: Padding = "border"
) -> torch.Tensor:
    """Displacement of ``(id + u) ∘ (id + v)``: first ``x ↦ x + v(x)``, then ``y ↦ y + u(y)``.

    Returns ``w(x) = v(x) + u(x + v(x))``. ``padding`` decides ``u`` outside the grid:
    ``'border'`` extends it (scaling and squaring); ``'zeros'`` treats it as zero, as
    :class:`DisplacementField` does.
    """
    check_field(u, "u")
    check_field(v, "v")
    if u.shape[1:] != v.shape[1:]:
        raise ValueError(f"compose: fields differ in shape, {tuple(u.shape)} vs {tuple(v.shape)}")
    return v + warp(u, v, "linear", padding)


class FieldInverse(NamedTuple):
    """Result of :func:`invert_displacement`.

    ``residual`` is ``max_x |w(x) + u(x + w(x))|`` per batch element (voxels): how far
    ``(id + u) ∘ (id + w)`` is from the identity; ``iterations`` the updates performed.
    """

    displacement: torch.Tensor
    residual: torch.Tensor
    iterations: int


def invert_displacement(
    u: torch.Tensor,
    iterations: int = 50,
    tolerance: float = 1e-3,
    padding: Padding = "border",
) -> FieldInverse:
    """Inverse ``w`` of ``x ↦ x + u(x)`` by the fixed-point iteration ``w ← -u(x + w)``.

    Stops when the residual (see :class:`FieldInverse`) is at most ``tolerance`` voxels or
    after ``iterations`` updates. Converges where ``u`` is a contraction (``|∇u| < 1``), as
    for smooth fields of moderate amplitude.
    """
    check_field(u)
    if iterations < 0:
        raise ValueError(f"invert_displacement: iterations must be >= 0, got {iterations}")
    w = -u
    for n in range(iterations + 1):
        r = w + warp(u, w, "linear", padding)
        res = r.norm(dim=1).flatten(1).amax(1)
        if n == iterations or float(res.max()) <= tolerance:
            break
        w = w - r
    return FieldInverse(w, res.detach(), n)


def resize_linear(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``x (N, C, *S)`` sampled linearly on ``Grid.resized(shape)`` of its grid (same first and
    last voxel centres, ``align_corners=True``), values unchanged (no anti-aliasing)."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 2]
    return F.interpolate(x, size=tuple(int(s) for s in shape), mode=mode, align_corners=True)


def resize_displacement(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample ``u`` onto ``Grid.resized(shape)`` of its grid (same first/last voxel centres).

    Linear interpolation with ``align_corners=True``; component ``d`` is rescaled by
    ``(new_d - 1) / (old_d - 1)`` so it stays in voxel units of the new grid.
    """
    d = check_field(u)
    shape = tuple(int(s) for s in shape)
    if len(shape) != d:
        raise ValueError(f"resize_displacement: expected {d} sizes, got {shape}")
    out = resize_linear(u, shape)
    old = u.shape[2:]
    scale = [(n - 1) / (o - 1) if n > 1 and o > 1 else 1.0 for n, o in zip(shape, old, strict=True)]
    return out * torch.tensor(scale, dtype=u.dtype, device=u.device).view(1, d, *([1] * d))
