"""Correlation layers between two feature maps (2D and 3D): all-pairs and windowed.

Rocco, Arandjelović and Sivic, "Convolutional neural network architecture for geometric
matching", CVPR 2017, Sec. 3.2: with L2-normalized descriptors ``f_A, f_B ∈ R^{C×h×w}``, the
correlation map ``c_AB ∈ R^{(h·w)×h×w}`` holds at every position ``(i, j)`` of ``f_B`` the
scalar products with *all* descriptors of ``f_A``:
``c_AB(k, i, j) = f_B(i, j)ᵀ f_A(i_k, j_k)``, ``k`` enumerating the positions of ``f_A``
(row-major). It is followed by a ReLU and an L2 normalization across ``k`` (Sec. 3.2,
"normalization"), which down-weights ambiguous matches. :func:`correlation` and
:class:`FeatureCorrelation` compute this for feature maps of any spatial dimension (2D or 3D).

Dosovitskiy et al., "FlowNet: learning optical flow with convolutional networks", ICCV 2015,
Sec. 3: the correlation of two patches of size ``K = 2k + 1`` centred at ``x₁`` in ``f₁`` and
``x₂`` in ``f₂`` is ``c(x₁, x₂) = Σ_{o ∈ [−k, k]^D} ⟨f₁(x₁ + o), f₂(x₂ + o)⟩``, computed only for
displacements ``x₂ − x₁`` within ``±d`` (step ``s₂``) at positions ``x₁`` of step ``s₁``:
a *local* volume of ``(2⌊d/s₂⌋ + 1)^D`` channels, one per displacement, instead of one per
position. :func:`local_correlation` and :class:`LocalCorrelation` compute it (FlowNet's
implementation divides by the number of summed elements, ``K^D · C``; so do they).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "l2_normalize",
    "correlation",
    "FeatureCorrelation",
    "displacements",
    "local_correlation",
    "LocalCorrelation",
]


def l2_normalize(features: Tensor, eps: float = 1e-6) -> Tensor:
    """Features ``(N, C, *S)`` divided by their Euclidean norm over channels (per position)."""
    if features.dim() < 3:
        raise ValueError(f"l2_normalize: expected (N, C, *S), got {tuple(features.shape)}")
    return F.normalize(features, p=2.0, dim=1, eps=eps)


def correlation(source: Tensor, target: Tensor) -> Tensor:
    """All-pairs correlation volume ``(N, prod(S_source), *S_target)``.

    ``out[n, k, x] = Σ_c source[n, c, p_k] · target[n, c, x]`` where ``p_k`` is the ``k``-th
    position of ``source`` in row-major (C) order. ``source`` ``(N, C, *S_source)`` and
    ``target`` ``(N, C, *S_target)`` must have 2 or 3 spatial dims each (the same number) and
    the same ``N`` and ``C``. Rocco et al.'s ``c_AB`` is ``correlation(f_A, f_B)``.
    """
    if source.dim() not in (4, 5) or target.dim() != source.dim():
        raise ValueError(
            "correlation: source and target must both be (N, C, *S) with 2 or 3 spatial dims; "
            f"got {tuple(source.shape)} and {tuple(target.shape)}"
        )
    if source.shape[:2] != target.shape[:2]:
        raise ValueError(
            "correlation: source and target need the same batch size and channels; got "
            f"{tuple(source.shape)} and {tuple(target.shape)}"
        )
    n, c = source.shape[:2]
    a = source.reshape(n, c, -1)  # (N, C, P_source)
    b = target.reshape(n, c, -1)  # (N, C, P_target)
    return torch.bmm(a.transpose(1, 2), b).reshape(n, a.shape[-1], *target.shape[2:])


class FeatureCorrelation(nn.Module):
    """Rocco et al.'s correlation layer with its normalizations.

    Args:
        normalize_features: L2-normalize both feature maps over channels first (Rocco: yes).
        normalize_output: ReLU then L2 normalization of the volume over its correlation
            channels (Rocco: yes).

    ``forward(source, target)`` returns :func:`correlation` ``(N, prod(S_source), *S_target)``.
    """

    def __init__(self, normalize_features: bool = True, normalize_output: bool = True) -> None:
        super().__init__()
        self.normalize_features = bool(normalize_features)
        self.normalize_output = bool(normalize_output)

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        if self.normalize_features:
            source, target = l2_normalize(source), l2_normalize(target)
        c = correlation(source, target)
        if self.normalize_output:
            c = l2_normalize(F.relu(c))
        return c

    def extra_repr(self) -> str:
        return (
            f"normalize_features={self.normalize_features}, "
            f"normalize_output={self.normalize_output}"
        )


def displacements(ndim: int, max_displacement: int, stride: int = 1) -> Tensor:
    """The displacements ``(M, ndim)`` (int64) of a local correlation: every vector whose
    components are multiples of ``stride`` in ``[−max_displacement, max_displacement]``, in
    row-major order (last axis fastest) — the channel order of :func:`local_correlation`."""
    if ndim not in (2, 3) or max_displacement < 0 or stride < 1:
        raise ValueError(
            "displacements: need ndim 2 or 3, max_displacement >= 0 and stride >= 1; got "
            f"{ndim}, {max_displacement}, {stride}"
        )
    r = int(max_displacement) // int(stride)
    steps = torch.arange(-r, r + 1) * int(stride)
    mesh = torch.meshgrid(*([steps] * ndim), indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], 1)


def local_correlation(
    first: Tensor,
    second: Tensor,
    max_displacement: int,
    stride1: int = 1,
    stride2: int = 1,
    patch_size: int = 1,
    normalize: bool = False,
) -> Tensor:
    """FlowNet's correlation volume ``(N, M, *S')`` of ``first`` and ``second`` ``(N, C, *S)``.

    Channel ``m`` holds, at position ``x`` of the output grid (``first``'s positions of step
    ``stride1``, starting at 0), the mean over channels and the ``patch_size^D`` patch offsets
    ``o`` of ``first(x + o) · second(x + δ_m + o)``, with ``δ_m`` the ``m``-th of
    :func:`displacements` ``(ndim, max_displacement, stride2)``. Values outside either map
    are zero (zero padding), so the output has ``first``'s size divided by ``stride1``
    (rounded up). ``patch_size`` must be odd.

    ``normalize``: first give every position's feature vector zero mean and unit length over
    the channels, and sum over them instead of averaging: each product is then the normalized
    cross-correlation (cosine) of the two vectors, in ``[−1, 1]``.
    """
    if first.dim() not in (4, 5) or first.shape != second.shape:
        raise ValueError(
            "local_correlation: first and second must be (N, C, *S) of the same shape with 2 "
            f"or 3 spatial dims; got {tuple(first.shape)} and {tuple(second.shape)}"
        )
    if patch_size < 1 or patch_size % 2 != 1 or stride1 < 1:
        raise ValueError(
            f"local_correlation: patch_size must be odd and >= 1 and stride1 >= 1; got "
            f"{patch_size} and {stride1}"
        )
    ndim = first.dim() - 2
    if normalize:
        channels = first.shape[1]
        first, second = (
            F.normalize(t - t.mean(1, keepdim=True), dim=1) * channels**0.5 for t in (first, second)
        )
    shifts = displacements(ndim, max_displacement, stride2)
    d, size = int(shifts.abs().max()) if len(shifts) else 0, first.shape[2:]
    padded = F.pad(second, [d] * (2 * ndim))
    products = []
    for shift in shifts.tolist():
        window = tuple(slice(d + s, d + s + n) for s, n in zip(shift, size, strict=True))
        products.append((first * padded[(slice(None), slice(None), *window)]).mean(1))
    out = torch.stack(products, 1)  # (N, M, *S): the patch-size-1 correlation at every x
    if patch_size > 1:
        pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
        out = pool(out, patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)
    if stride1 > 1:
        out = out[(slice(None), slice(None), *([slice(None, None, stride1)] * ndim))]
    return out


class LocalCorrelation(nn.Module):
    """FlowNetC's correlation layer (:func:`local_correlation`), followed by a leaky ReLU
    (FlowNet's Caffe model: ``corr → ReLU(0.1)``) when ``activation`` is true.

    Args:
        max_displacement: ``d``, in positions of the feature maps (FlowNetC: 20 at 1/8 of
            384×512 inputs).
        stride1, stride2: steps of the positions and of the displacements (FlowNetC: 1, 2).
        patch_size: ``K`` (FlowNetC: 1).
        activation: the leaky ReLU after the correlation.
        normalize: correlate zero-mean, unit-length feature vectors (:func:`local_correlation`;
            not in FlowNet).
    """

    def __init__(
        self,
        max_displacement: int,
        stride1: int = 1,
        stride2: int = 1,
        patch_size: int = 1,
        activation: bool = True,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        displacements(2, max_displacement, stride2)  # validates
        self.max_displacement, self.stride1 = int(max_displacement), int(stride1)
        self.stride2, self.patch_size = int(stride2), int(patch_size)
        self.activation, self.normalize = bool(activation), bool(normalize)

    def out_channels(self, ndim: int) -> int:
        """Number of displacements ``M`` (channels of the output) in ``ndim`` dimensions."""
        return (2 * (self.max_displacement // self.stride2) + 1) ** ndim

    def forward(self, first: Tensor, second: Tensor) -> Tensor:
        out = local_correlation(
            first,
            second,
            self.max_displacement,
            self.stride1,
            self.stride2,
            self.patch_size,
            self.normalize,
        )
        return F.leaky_relu(out, 0.1) if self.activation else out

    def extra_repr(self) -> str:
        return (
            f"max_displacement={self.max_displacement}, stride1={self.stride1}, "
            f"stride2={self.stride2}, patch_size={self.patch_size}, normalize={self.normalize}"
        )
