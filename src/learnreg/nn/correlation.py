"""Correlation layers: all-pairs dot products between two feature maps (2D and 3D).

Rocco, Arandjelović and Sivic, "Convolutional neural network architecture for geometric
matching", CVPR 2017, Sec. 3.2: with L2-normalized descriptors ``f_A, f_B ∈ R^{C×h×w}``, the
correlation map ``c_AB ∈ R^{(h·w)×h×w}`` holds at every position ``(i, j)`` of ``f_B`` the
scalar products with *all* descriptors of ``f_A``:
``c_AB(k, i, j) = f_B(i, j)ᵀ f_A(i_k, j_k)``, ``k`` enumerating the positions of ``f_A``
(row-major). It is followed by a ReLU and an L2 normalization across ``k`` (Sec. 3.2,
"normalization"), which down-weights ambiguous matches. :func:`correlation` and
:class:`FeatureCorrelation` compute this for feature maps of any spatial dimension (2D or 3D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["l2_normalize", "correlation", "FeatureCorrelation"]


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
