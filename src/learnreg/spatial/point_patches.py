"""Intensity patches at points: the feature vectors of voxel-wise detectors.

:func:`patch_features` gathers, for integer voxels, the image samples of a cube around each
at several scales (strides of a Gaussian-smoothed image); :func:`patch_offsets` is the cube.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from learnreg.spatial.filters import gaussian_blur

__all__ = ["patch_features", "patch_offsets"]


def patch_offsets(ndim: int, size: int) -> Tensor:
    """The ``(size**ndim, ndim)`` integer offsets of a cube patch centred at 0 (odd size)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"patch size must be odd and >= 1, got {size}")
    h = size // 2
    axes = [torch.arange(-h, h + 1)] * ndim
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, ndim)


def patch_features(image: Tensor, points: Tensor, size: int, scales: Sequence[int]) -> Tensor:
    """Multi-scale patches of ``image`` ``(1, *S)`` centred at integer voxels ``points``
    ``(..., D)`` (clamped into the image): for each scale ``s`` the image smoothed by a
    Gaussian of σ = s/2 voxels (none at s = 1) sampled on a ``size``-wide cube of stride
    ``s``; zero outside the image. Returns ``(..., len(scales) · size**D)``."""
    d = image.dim() - 1
    if image.shape[0] != 1 or d not in (2, 3):
        raise ValueError(
            f"patch_features: expected a (1, *S) 2D or 3D image, got {tuple(image.shape)}"
        )
    if points.shape[-1] != d or points.is_floating_point():
        raise ValueError(f"patch_features: points must be integer (..., {d}), got {points.dtype}")
    if not scales or any(int(s) < 1 for s in scales):
        raise ValueError(f"patch_features: scales must be positive integers, got {list(scales)}")
    offsets = patch_offsets(d, size).to(points.device)
    upper = torch.tensor(image.shape[1:], device=points.device) - 1
    points = torch.minimum(points.clamp(min=0), upper)
    feats = []
    for s in scales:
        s = int(s)
        x = image if s == 1 else gaussian_blur(image[None], s / 2.0)[0]
        pad = s * (size // 2)
        x = nn.functional.pad(x[None], (pad,) * (2 * d))[0, 0]
        strides = torch.tensor(x.stride(), device=points.device)
        centre = ((points + pad) * strides).sum(-1)  # flat index in the padded image
        feats.append(torch.take(x, centre[..., None] + (s * offsets * strides).sum(-1)))
    return torch.cat(feats, dim=-1)
