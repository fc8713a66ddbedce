"""Separable filters on (N, C, *S) tensors (differentiable), as banded matrix products.

Filtering along one axis is a product with an ``n × n`` banded matrix: it runs on BLAS,
which on CPU is several times faster than ``conv3d`` with 1D kernels, and it handles the
border (zero or replicate padding) inside the matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

from learnreg.core.options import check_option

__all__ = ["gaussian_kernel1d", "gaussian_blur", "separable_filter", "band_matrix", "PADDINGS"]

PADDINGS = ("zeros", "replicate")


def gaussian_kernel1d(sigma: float, truncate: float = 3.0) -> tuple[float, ...]:
    """Normalized 1D Gaussian of standard deviation ``sigma`` (voxels), radius ``truncate·σ``."""
    if sigma <= 0:
        return (1.0,)
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return tuple((k / k.sum()).tolist())


@lru_cache(maxsize=128)
def band_matrix(
    n: int, kernel: tuple[float, ...], padding: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``B[i, j]``: weight of input ``j`` in output ``i`` (correlation with ``kernel``)."""
    r = len(kernel) // 2
    k = torch.tensor(kernel, dtype=torch.float64)
    band = torch.zeros(n, n, dtype=torch.float64)
    i = torch.arange(n)
    for t in range(-r, r + 1):
        j = i + t
        if padding == "replicate":
            band.index_put_((i, j.clamp(0, n - 1)), k[t + r].expand(n), accumulate=True)
        else:
            ok = (j >= 0) & (j < n)
            band[i[ok], j[ok]] += k[t + r]
    return band.to(dtype=dtype, device=device)


def separable_filter(
    x: torch.Tensor, kernels: Sequence[Sequence[float]], padding: str = "replicate"
) -> torch.Tensor:
    """Filter ``x (N, C, *S)`` with one odd 1D kernel per spatial axis; same-size output."""
    check_option("padding", padding, PADDINGS)
    d = x.dim() - 2
    if len(kernels) != d:
        raise ValueError(f"separable_filter: need {d} kernels for input {tuple(x.shape)}")
    shape = x.shape
    out = x
    for axis, kern in enumerate(kernels):
        kern = tuple(float(v) for v in kern)
        if len(kern) % 2 == 0:
            raise ValueError(f"kernels must have odd length, got {len(kern)}")
        if len(kern) == 1:
            out = out * kern[0] if kern[0] != 1.0 else out
            continue
        n = shape[axis + 2]
        m = band_matrix(n, kern, padding, x.dtype, x.device)
        if axis == d - 1:
            out = out @ m.mT
        else:
            lead, rest = math.prod(shape[: axis + 2]), math.prod(shape[axis + 3 :])
            out = (m @ out.reshape(lead, n, rest)).reshape(shape)
    return out


def gaussian_blur(
    x: torch.Tensor, sigma: float | Sequence[float], truncate: float = 3.0
) -> torch.Tensor:
    """Gaussian smoothing of ``x (N, C, *S)`` (replicate border); ``sigma`` in voxels."""
    d = x.dim() - 2
    sig = [float(sigma)] * d if isinstance(sigma, int | float) else [float(s) for s in sigma]
    return separable_filter(x, [gaussian_kernel1d(s, truncate) for s in sig], "replicate")
