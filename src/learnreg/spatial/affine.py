"""Affine transforms of world points, as homogeneous matrices."""

from __future__ import annotations

import numpy as np
import torch

from learnreg.core.grid import apply_matrix
from learnreg.spatial.base import SpatialTransform

__all__ = ["AffineTransform"]


class AffineTransform(SpatialTransform):
    """``x ↦ A x + t`` in world space, stored as homogeneous ``(N, D+1, D+1)`` matrices.

    Args:
        matrix: ``(D+1, D+1)`` or ``(N, D+1, D+1)``; or ``(N, D, D+1)`` (last row implied).
            A floating-point tensor keeps its dtype (and its graph); anything else is float32.
        learnable: make the matrix an ``nn.Parameter`` (classical optimization).
    """

    def __init__(self, matrix: torch.Tensor | np.ndarray, learnable: bool = False) -> None:
        super().__init__()
        m = torch.as_tensor(matrix)
        if not (isinstance(matrix, torch.Tensor) and m.is_floating_point()):
            m = m.float()
        if m.dim() == 2:
            m = m.unsqueeze(0)
        d = m.shape[-1] - 1
        if d not in (2, 3) or m.shape[-2] not in (d, d + 1):
            raise ValueError(
                f"affine matrix must be (N, D+1, D+1) with D in 2, 3; got {tuple(m.shape)}"
            )
        if m.shape[-2] == d:
            m = homogeneous(m)
        self.ndim = d
        self._register_tensor("matrix", m, learnable)

    @classmethod
    def identity(cls, ndim: int, batch: int = 1, learnable: bool = False) -> AffineTransform:
        return cls(torch.eye(ndim + 1).repeat(batch, 1, 1), learnable=learnable)

    def homogeneous(self) -> torch.Tensor:
        return self.matrix

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        m = self.homogeneous()
        if m.shape[0] == 1:
            return apply_matrix(m[0], points)
        return apply_matrix(m, points)

    def inverse(self) -> AffineTransform:
        """Exact inverse (a plain :class:`AffineTransform`); differentiable, same dtype."""
        m = self.homogeneous()
        return AffineTransform(torch.linalg.inv(m.double()).to(m.dtype))


def homogeneous(m: torch.Tensor) -> torch.Tensor:
    """Append the ``[0, ..., 0, 1]`` row to ``(N, D, D+1)`` matrices."""
    d = m.shape[-1] - 1
    row = torch.zeros(*m.shape[:-2], 1, d + 1, dtype=m.dtype, device=m.device)
    row[..., 0, d] = 1
    return torch.cat([m, row], dim=-2)
