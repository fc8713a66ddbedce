"""A registration result: the fixed grid and the transform chain, usable in both directions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.base import SpatialTransform, TransformChain
from learnreg.spatial.differential import jacobian_determinant
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.lddmm import GeodesicShooting
from learnreg.spatial.linear import compose_affine
from learnreg.spatial.sampling import Interpolation, resample
from learnreg.spatial.svf import StationaryVelocityField

__all__ = ["RegistrationResult", "split_linear"]


def _first(t: AffineTransform) -> AffineTransform:
    return AffineTransform(t.homogeneous()[:1].detach())


@torch.no_grad()
def split_linear(transform: SpatialTransform) -> tuple[SpatialTransform | None, AffineTransform]:
    """``transform = linear ∘ head``: its trailing linear transforms composed into one affine
    (first of the batch, detached), and the transforms before them (``None`` if there are
    none), as :class:`RegistrationResult` stores a registration."""
    parts = list(transform.transforms) if isinstance(transform, TransformChain) else [transform]
    dims = transform.ndim
    linear = AffineTransform.identity(dims)
    while parts and isinstance(parts[-1], AffineTransform):
        linear = compose_affine(linear, _first(parts.pop()))
    head = None if not parts else parts[0] if len(parts) == 1 else TransformChain(parts)
    return head, linear


def _native_field(head: SpatialTransform | None) -> DisplacementField | None:
    """``head`` as a displacement on its own grid, when it has one (a displacement field,
    a stationary velocity integrated on its grid), first of the batch."""
    if isinstance(head, DisplacementField):
        return DisplacementField(head.grid, head.voxel_field()[:1].detach())
    if isinstance(head, StationaryVelocityField):
        return DisplacementField(head.grid, head.exp()[:1].detach())
    return None


@dataclass
class RegistrationResult:
    """``x_moving = affine(x + u(x))`` for ``x`` in the fixed image's world space (ANTs' order).

    Attributes:
        fixed_grid, moving_grid: the grids of the registered pair.
        affine: world-to-world linear part (identity when ``None``).
        deformable: displacement on the fixed grid (voxel units), applied before the affine.
        inverse_deformable: its inverse on the fixed grid (``y ↦ y + w(y)`` undoes ``u``).
        info: what produced it (method, config, timings, ...), saved with the result.
        native_deformable, native_inverse: the same two fields on the (coarser) grid they
            were computed on — a velocity's integration grid, a network's grid — when there
            is one; the fixed-grid fields are their linear interpolation (zero outside, as ITK
            interpolates a displacement field), so files of these are exact and small.
        velocity: the velocity parametrization of the deformable part on its grid, when the
            registration optimized one: the stationary velocity whose exponential it is
            (classical SVF stage) or the geodesic shot from its initial momentum (LDDMM stage,
            :class:`~learnreg.spatial.lddmm.GeodesicShooting`); kept in memory only (e.g. as
            the reference of a supervised network), not saved.
    """

    fixed_grid: Grid
    moving_grid: Grid
    affine: AffineTransform | None = None
    deformable: DisplacementField | None = None
    inverse_deformable: DisplacementField | None = None
    info: dict = field(default_factory=dict)
    native_deformable: DisplacementField | None = None
    native_inverse: DisplacementField | None = None
    velocity: StationaryVelocityField | GeodesicShooting | None = None

    def __post_init__(self) -> None:
        if self.fixed_grid.ndim != self.moving_grid.ndim:
            raise ValueError("fixed and moving grids differ in dimensionality")
        for f in (self.deformable, self.inverse_deformable):
            if f is not None and not f.grid.allclose(self.fixed_grid):
                raise ValueError("deformable fields must live on the fixed grid")
        if self.native_deformable is not None and self.deformable is None:
            raise ValueError("native_deformable without the deformable field it is native to")
        if self.native_inverse is not None and self.inverse_deformable is None:
            raise ValueError("native_inverse without the inverse field it is native to")

    @classmethod
    def from_native(
        cls,
        fixed_grid: Grid,
        moving_grid: Grid,
        affine: AffineTransform | None,
        native: DisplacementField,
        native_inverse: DisplacementField | None,
        info: dict | None = None,
        velocity: StationaryVelocityField | GeodesicShooting | None = None,
    ) -> RegistrationResult:
        """The result whose deformable part is ``native`` (and its inverse), fields on any
        grid, expressed on the fixed grid by linear interpolation (zero outside); a field
        already on the fixed grid is used as it is (and not kept as native). ``velocity``:
        the velocity ``native`` integrates, if any."""

        def on_fixed(f: DisplacementField | None) -> DisplacementField | None:
            if f is None or f.grid.allclose(fixed_grid):
                return f
            return DisplacementField(fixed_grid, f.voxel_displacement(fixed_grid)[:1])

        def coarse(f: DisplacementField | None) -> DisplacementField | None:
            return None if f is None or f.grid.allclose(fixed_grid) else f

        fwd, inv = on_fixed(native), on_fixed(native_inverse)
        info = dict(info or {})
        return cls(
            fixed_grid,
            moving_grid,
            affine,
            fwd,
            inv,
            info,
            coarse(native),
            coarse(native_inverse),
            velocity,
        )

    @classmethod
    @torch.no_grad()
    def from_transform(
        cls,
        transform: SpatialTransform,
        fixed_grid: Grid,
        moving_grid: Grid,
        then: AffineTransform | None = None,
        info: dict | None = None,
        invert: bool = True,
    ) -> RegistrationResult:
        """The result of a predicted fixed→moving ``transform`` (first of a batch), followed
        by the affine ``then`` (e.g. the pre-alignment a network's input went through):
        ``x_moving = then(transform(x))``.

        The trailing linear transforms of ``transform`` (a :class:`TransformChain` or one
        transform) and ``then`` become the result's affine, written as an ITK matrix; what
        comes before them (fields, B-splines, splines, homographies, …) becomes one
        displacement on the fixed grid and, with ``invert``, its inverse — exact where the
        parts have an exact inverse (velocity fields, homographies), iterative otherwise.
        """
        head, linear = split_linear(transform)
        affine = linear if then is None else compose_affine(_first(then), linear)
        native = _native_field(head)
        if native is not None:
            back = _native_field(head.inverse()) if invert else None
            return cls.from_native(fixed_grid, moving_grid, affine, native, back, info)
        deformable = inverse = None
        if head is not None:
            world = head.displacement(fixed_grid)[:1]
            deformable = DisplacementField.from_world(fixed_grid, world)
            if invert:
                back = head.inverse().displacement(fixed_grid)[:1]
                inverse = DisplacementField.from_world(fixed_grid, back)
        return cls(fixed_grid, moving_grid, affine, deformable, inverse, dict(info or {}))

    @property
    def ndim(self) -> int:
        return self.fixed_grid.ndim

    def linear(self) -> AffineTransform:
        """The affine part (identity when there is none)."""
        return self.affine if self.affine is not None else AffineTransform.identity(self.ndim)

    def transform(self) -> SpatialTransform:
        """Fixed-space world points to moving-space world points."""
        parts: list[SpatialTransform] = [self.linear()]
        if self.deformable is not None:
            parts.insert(0, self.deformable)
        return TransformChain(parts)

    def inverse_transform(self) -> SpatialTransform:
        """Moving-space world points to fixed-space world points."""
        if self.deformable is not None and self.inverse_deformable is None:
            raise ValueError("this result has no inverse deformable field")
        parts: list[SpatialTransform] = [self.linear().inverse()]
        if self.inverse_deformable is not None:
            parts.append(self.inverse_deformable)
        return TransformChain(parts)

    @torch.no_grad()
    def warp(self, moving: Image, mode: Interpolation = "linear") -> Image:
        """Resample a moving-space image onto the fixed grid."""
        self._check(moving)
        return resample(moving, self.fixed_grid, self.transform(), mode)

    @torch.no_grad()
    def warp_inverse(self, fixed: Image, mode: Interpolation = "linear") -> Image:
        """Resample a fixed-space image onto the moving grid."""
        self._check(fixed)
        return resample(fixed, self.moving_grid, self.inverse_transform(), mode)

    @torch.no_grad()
    def map_points(self, points: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Map world points ``(P, D)``: fixed→moving, or moving→fixed with ``inverse``."""
        t = self.inverse_transform() if inverse else self.transform()
        return t(points.float().unsqueeze(0))[0]

    @torch.no_grad()
    def jacobian_determinant(self) -> torch.Tensor:
        """det of the Jacobian of ``x ↦ x + u(x)`` on the fixed grid, ``(*S)`` (1 without u),
        in the field's float32 (statistics within ~1e-6 of
        :func:`~learnreg.metrics.jacobian_stats`' float64)."""
        if self.deformable is None:
            return torch.ones(self.fixed_grid.shape)
        return jacobian_determinant(self.deformable.voxel_field().float())[0]

    def _check(self, image: Image) -> None:
        if image.ndim != self.ndim:
            raise ValueError(
                f"{image.name}: a {image.ndim}D image cannot be warped by a {self.ndim}D registration"
            )
