"""Separable smoothing filters on (N, C, *S) tensors (differentiable)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["gaussian_kernel1d", "gaussian_blur", "separable_filter"]


def gaussian_kernel1d(
    sigma: float, truncate: float = 3.0, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """Normalized 1D Gaussian of standard deviation ``sigma`` (voxels), radius ``truncate·σ``."""
    if sigma <= 0:
        return torch.ones(1, dtype=dtype, device=device)
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def separable_filter(
    x: torch.Tensor, kernels: Sequence[torch.Tensor], padding: str = "replicate"
) -> torch.Tensor:
    """Filter ``x (N, C, *S)`` with one odd-length 1D kernel per spatial axis (channel-wise).

    ``padding``: ``"replicate"``, ``"reflect"`` or ``"zeros"``; output has the input's shape.
    """
    d = x.dim() - 2
    if len(kernels) != d:
        raise ValueError(f"separable_filter: need {d} kernels, got {len(kernels)}")
    conv = F.conv2d if d == 2 else F.conv3d
    c = x.shape[1]
    for axis, k in enumerate(kernels):
        if k.numel() == 1:
            x = x * k.to(x)
            continue
        r = k.numel() // 2
        shape = [1] * d
        shape[axis] = k.numel()
        w = k.to(x).view(1, 1, *shape).expand(c, 1, *shape)
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = r
        if padding == "zeros":
            x = F.pad(x, pad)
        else:
            if x.shape[axis + 2] <= r and padding == "reflect":
                raise ValueError(f"reflect padding needs more than {r} voxels along axis {axis}")
            x = F.pad(x, pad, mode=padding)
        x = conv(x, w, groups=c)
    return x


def gaussian_blur(
    x: torch.Tensor, sigma: float | Sequence[float], truncate: float = 3.0
) -> torch.Tensor:
    """Gaussian smoothing of ``x (N, C, *S)``; ``sigma`` in voxels, scalar or per axis."""
    d = x.dim() - 2
    sig = [float(sigma)] * d if isinstance(sigma, int | float) else [float(s) for s in sigma]
    return separable_filter(
        x, [gaussian_kernel1d(s, truncate, x.dtype, x.device) for s in sig], "replicate"
    )
