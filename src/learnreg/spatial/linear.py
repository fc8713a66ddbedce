"""Parametrized linear transforms: translation, rigid, similarity and full affine.

Each maps fixed world points (RAS mm) to moving ones, ITK-style about a ``center`` ``c``:
``x ↦ L (x - c) + c + t``. Parameters ``(N, P)``, translation last (except :class:`Affine`),
and zero parameters are the identity:

- :class:`Translation` ``[t]``, ``P = D``;
- :class:`Rigid` ``[ω, t]``: ``L = exp([ω]×)``; in 2D ``ω`` is one angle (radians, from world
  axis 0 towards axis 1), in 3D a rotation vector (axis × angle, radians, world axes), so
  ``P = 3`` (2D) or ``6`` (3D);
- :class:`Similarity` ``[ω, log s, t]``: ``L = s exp([ω]×)``, ``P = 4`` or ``7``;
- :class:`Affine` the ``(D, D+1)`` matrix ``[L | t]`` minus ``[I | 0]``, row-major,
  ``P = 6`` or ``12``.

Parameters are the module's own ``nn.Parameter`` (``learnable=True``) or a network's output
(:meth:`from_params`, gradients flow to it). ``inverse()`` is an exact :class:`AffineTransform`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.base import SpatialTransform

__all__ = [
    "Affine",
    "Rigid",
    "Similarity",
    "Translation",
    "compose_affine",
    "rotation_matrix",
]


def rotation_matrix(omega: torch.Tensor) -> torch.Tensor:
    """Rotation ``exp([ω]×)`` from ``(N, 1)`` angles (2D) or ``(N, 3)`` rotation vectors (3D)."""
    n, r = omega.shape
    if r not in (1, 3):
        raise ValueError(f"rotation parameters must be (N, 1) or (N, 3); got {tuple(omega.shape)}")
    zero = torch.zeros_like(omega[:, 0])
    if r == 1:
        a = omega[:, 0]
        rows = [[zero, -a], [a, zero]]
    else:
        x, y, z = omega.unbind(1)
        rows = [[zero, -z, y], [z, zero, -x], [-y, x, zero]]
    skew = torch.stack([torch.stack(row, -1) for row in rows], -2)
    return torch.linalg.matrix_exp(skew)


class _ParametricAffine(AffineTransform):
    """An :class:`AffineTransform` whose matrix is built from parameters ``(N, P)``."""

    @staticmethod
    def num_params(ndim: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _linear_translation(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Linear part ``(N, D, D)`` and translation ``(N, D)`` from parameters."""
        raise NotImplementedError  # pragma: no cover - abstract

    def __init__(
        self,
        ndim: int | None = None,
        batch: int = 1,
        *,
        params: torch.Tensor | None = None,
        center: torch.Tensor | Sequence[float] | None = None,
        learnable: bool = False,
    ) -> None:
        SpatialTransform.__init__(self)  # no ``matrix`` tensor: it is derived
        name = type(self).__name__
        if params is None:
            if ndim not in (2, 3):
                raise ValueError(f"{name}: ndim must be 2 or 3 without params, got {ndim}")
            params = torch.zeros(batch, self.num_params(ndim))
        if params.dim() == 1:
            params = params.unsqueeze(0)
        sizes = {self.num_params(d): d for d in (2, 3)}
        if params.dim() != 2 or params.shape[1] not in sizes:
            raise ValueError(
                f"{name}: params must be (N, P) with P = {sorted(sizes)} for 2D/3D; "
                f"got {tuple(params.shape)}"
            )
        d = sizes[params.shape[1]]
        if ndim is not None and ndim != d:
            raise ValueError(f"{name}: params {tuple(params.shape)} are {d}D, not {ndim}D")
        if not params.is_floating_point():
            params = params.float()
        self.ndim = d
        self._register_tensor("params", params, learnable)
        c = torch.zeros(1, d) if center is None else torch.as_tensor(center)
        c = c.to(params.dtype).reshape(-1, d)
        self.register_buffer("center", c.to(params.device))

    @classmethod
    def from_params(
        cls,
        params: torch.Tensor,
        center: torch.Tensor | Sequence[float] | None = None,
        learnable: bool = False,
    ) -> _ParametricAffine:
        """From parameters ``(N, P)``, e.g. a network's regression head output."""
        return cls(params=params, center=center, learnable=learnable)

    @classmethod
    def identity(cls, ndim: int, batch: int = 1, learnable: bool = False) -> _ParametricAffine:
        return cls(ndim, batch, learnable=learnable)

    @property
    def matrix(self) -> torch.Tensor:
        """The homogeneous matrices ``(N, D+1, D+1)`` (derived from :attr:`params`)."""
        return self.homogeneous()

    def homogeneous(self) -> torch.Tensor:
        p = self.params
        lin, t = self._linear_translation(p)
        c = self.center.to(p.dtype)
        offset = t + c - (lin @ c.unsqueeze(-1)).squeeze(-1)
        n, d = lin.shape[0], self.ndim
        top = torch.cat([lin, offset.expand(n, d).unsqueeze(-1)], dim=-1)
        bottom = torch.zeros(n, 1, d + 1, dtype=p.dtype, device=p.device)
        bottom[..., d] = 1
        return torch.cat([top, bottom], dim=-2)

    def _eye(self, p: torch.Tensor) -> torch.Tensor:
        return torch.eye(self.ndim, dtype=p.dtype, device=p.device).expand(p.shape[0], -1, -1)

    def _num_rotations(self) -> int:
        return self.ndim * (self.ndim - 1) // 2


class Translation(_ParametricAffine):
    """``x ↦ x + t``; parameters ``[t]``."""

    @staticmethod
    def num_params(ndim: int) -> int:
        return ndim

    def _linear_translation(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._eye(p), p


class Rigid(_ParametricAffine):
    """``x ↦ R (x - c) + c + t``; parameters ``[ω, t]`` (angle or rotation vector, radians)."""

    @staticmethod
    def num_params(ndim: int) -> int:
        return ndim * (ndim - 1) // 2 + ndim

    def _linear_translation(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self._num_rotations()
        return rotation_matrix(p[:, :r]), p[:, r:]


class Similarity(_ParametricAffine):
    """``x ↦ s R (x - c) + c + t``; parameters ``[ω, log s, t]``."""

    @staticmethod
    def num_params(ndim: int) -> int:
        return ndim * (ndim - 1) // 2 + 1 + ndim

    def _linear_translation(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self._num_rotations()
        scale = p[:, r].exp().view(-1, 1, 1)
        return scale * rotation_matrix(p[:, :r]), p[:, r + 1 :]


class Affine(_ParametricAffine):
    """``x ↦ L (x - c) + c + t``; parameters ``[L | t] - [I | 0]``, row-major ``(N, D(D+1))``."""

    @staticmethod
    def num_params(ndim: int) -> int:
        return ndim * (ndim + 1)

    def _linear_translation(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.ndim
        m = p.view(-1, d, d + 1)
        return self._eye(p) + m[..., :d], m[..., d]


def compose_affine(a: AffineTransform, b: AffineTransform) -> AffineTransform:
    """``a ∘ b`` as one :class:`AffineTransform`: ``x ↦ a(b(x))`` (``b`` applied first).

    Batches broadcast (1 with N); differentiable in both.
    """
    if a.ndim != b.ndim:
        raise ValueError(f"compose_affine: {a.ndim}D with {b.ndim}D")
    ma, mb = a.homogeneous(), b.homogeneous()
    dtype = torch.promote_types(ma.dtype, mb.dtype)
    return AffineTransform(ma.to(dtype) @ mb.to(dtype))
