"""LDDMM: time-varying velocity fields and geodesic shooting from an initial momentum.

Large deformation diffeomorphic metric mapping (Beg et al. 2005; the shooting form of Vialard
et al. 2012, used by Quicksilver, Yang et al. 2017). A diffeomorphism is the flow of a
time-varying velocity ``v_t``, ``t ∈ [0, 1]``: ``dφ_t/dt = v_t ∘ φ_t``, ``φ_0 = id``. On a
geodesic the velocity is fixed by the initial momentum ``m_0``: ``v_t = K m_t`` with
``K = L⁻¹`` for the differential operator ``L = (−α∇² + γ)^c``, and ``m_t`` follows EPDiff,

    ∂m/∂t = −ad*_v m = −[(Dv)ᵀ m + (Dm) v + m div v].

Conventions (as all of :mod:`learnreg.spatial`): fields ``(N, D, *S)`` in voxel units of the
grid they live on. The registration transform maps fixed points to moving points, so the
moving image is pulled back by ``φ_1⁻¹``: :class:`GeodesicShooting` *is* ``φ_1⁻¹`` (its
displacement is that of the backward map) and its :meth:`~GeodesicShooting.inverse` is the
forward map ``φ_1``. Both maps are integrated along the same velocities, Lagrangian: ``φ_1``
moves each grid point forward from ``t = 0``, ``φ_1⁻¹`` moves it backward from ``t = 1`` along
``−v`` (midpoint rule, velocities sampled linearly and extended by their border values), so
the inverse comes from the backward flow rather than from inverting a field, and no map is
re-interpolated step after step. ``K`` is applied by FFT with the periodic discrete
Laplacian (``−∇²`` has the symbol ``Σ_axes 4 sin²(π k / n)``): momenta should vanish near the
grid's border, as they do on images with background margins. EPDiff is integrated by RK4
(``steps`` steps), its derivatives by central differences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from learnreg.core.grid import Grid
from learnreg.spatial.base import SpatialTransform
from learnreg.spatial.displacement import DisplacementField, on_grid
from learnreg.spatial.fields import check_field
from learnreg.spatial.sampling import warp

__all__ = [
    "DifferentialKernel",
    "epdiff",
    "shoot",
    "flow_maps",
    "backward_map",
    "forward_map",
    "TimeVaryingVelocityField",
    "GeodesicShooting",
    "DEFAULT_KERNEL",
]

DEFAULT_KERNEL = {"alpha": 100.0, "gamma": 1.0, "power": 2}
"""``L = (−α∇² + γ)^c`` of the classical ``lddmm`` preset and of Quicksilver (α in mm²)."""


class DifferentialKernel:
    """``L = (−α∇² + γ)^c`` on a periodic grid of ``shape`` with voxel ``spacing``, by FFT.

    :meth:`operator` applies ``L`` (momentum of a velocity), :meth:`smooth` its inverse ``K``
    (velocity of a momentum). ``α > 0`` sets the squared length scale (in units of
    ``spacing``², voxels² by default; the Laplacian is that of the physical grid, so
    anisotropic voxels smooth alike in every direction), ``γ > 0`` the zero-frequency
    weight, ``c ≥ 1`` the order (smoothness) of ``K``.
    """

    def __init__(
        self,
        shape: Sequence[int],
        alpha: float = 2.0,
        gamma: float = 1.0,
        power: int = 2,
        spacing: Sequence[float] | None = None,
    ) -> None:
        if alpha <= 0 or gamma <= 0 or int(power) != power or power < 1:
            raise ValueError(
                f"DifferentialKernel: need alpha > 0, gamma > 0 and an integer power >= 1; got "
                f"{alpha}, {gamma}, {power}"
            )
        self.spacing = tuple(float(h) for h in (spacing or [1.0] * len(shape)))
        if len(self.spacing) != len(shape) or min(self.spacing) <= 0:
            raise ValueError(f"DifferentialKernel: spacing {spacing} does not fit shape {shape}")
        self.shape = tuple(int(s) for s in shape)
        self.alpha, self.gamma, self.power = float(alpha), float(gamma), int(power)
        self._symbols: dict[tuple, torch.Tensor] = {}

    def symbol(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """``L``'s Fourier symbol on the ``rfftn`` frequencies of :attr:`shape`."""
        key = (dtype, str(device))
        if key not in self._symbols:
            d = len(self.shape)
            lap = torch.zeros((), dtype=torch.float64)
            for axis, n in enumerate(self.shape):
                f64 = torch.float64
                k = (
                    torch.fft.rfftfreq(n, dtype=f64)
                    if axis == d - 1
                    else torch.fft.fftfreq(n, dtype=f64)
                )
                s = 4 * torch.sin(torch.pi * k) ** 2 / self.spacing[axis] ** 2
                lap = lap + s.view(*([1] * axis), -1, *([1] * (d - axis - 1)))
            sym = (self.alpha * lap + self.gamma) ** self.power
            self._symbols[key] = sym.to(dtype=dtype, device=device)
        return self._symbols[key]

    def _apply(self, field: torch.Tensor, inverse: bool) -> torch.Tensor:
        check_field(field, "field")
        if tuple(field.shape[2:]) != self.shape:
            raise ValueError(
                f"DifferentialKernel: field of shape {tuple(field.shape[2:])} on a kernel of "
                f"{self.shape}"
            )
        dims = tuple(range(2, field.dim()))
        sym = self.symbol(field.dtype, field.device)
        spectrum = torch.fft.rfftn(field, dim=dims)
        spectrum = spectrum / sym if inverse else spectrum * sym
        return torch.fft.irfftn(spectrum, s=self.shape, dim=dims)

    def operator(self, velocity: torch.Tensor) -> torch.Tensor:
        """``L v``."""
        return self._apply(velocity, inverse=False)

    def smooth(self, momentum: torch.Tensor) -> torch.Tensor:
        """``K m = L⁻¹ m``."""
        return self._apply(momentum, inverse=True)


def _jacobian(field: torch.Tensor) -> torch.Tensor:
    """``J[:, i, j] = ∂_j field_i`` by central differences (one-sided at the border),
    ``(N, D, D, *S)``."""
    d = field.dim() - 2
    return torch.stack(torch.gradient(field, dim=tuple(range(2, 2 + d))), dim=2)


def epdiff(momentum: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """``∂m/∂t = −[(Dv)ᵀ m + (Dm) v + m div v]`` for fields ``(N, D, *S)`` (voxel units)."""
    jv, jm = _jacobian(velocity), _jacobian(momentum)
    d = momentum.shape[1]
    dv_t_m = (jv * momentum.unsqueeze(2)).sum(1)  # Σ_j ∂_i v_j m_j
    dm_v = (jm * velocity.unsqueeze(1)).sum(2)  # Σ_j ∂_j m_i v_j
    div = sum(jv[:, i, i] for i in range(d)).unsqueeze(1)
    return -(dv_t_m + dm_v + momentum * div)


def shoot(
    momentum: torch.Tensor, kernel: DifferentialKernel, steps: int = 10
) -> list[torch.Tensor]:
    """The velocities ``v_t = K m_t`` at ``t = 0, 1/steps, …, (steps−1)/steps`` of the
    geodesic from ``m_0 = momentum`` (EPDiff by RK4)."""
    check_field(momentum, "momentum")
    if steps < 1:
        raise ValueError(f"shoot: steps must be >= 1, got {steps}")
    dt = 1.0 / steps

    def rate(m: torch.Tensor) -> torch.Tensor:
        return epdiff(m, kernel.smooth(m))

    m, out = momentum, []
    for _ in range(steps):
        out.append(kernel.smooth(m))
        k1 = rate(m)
        k2 = rate(m + 0.5 * dt * k1)
        k3 = rate(m + 0.5 * dt * k2)
        k4 = rate(m + dt * k3)
        m = m + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return out


SUBSTEPS = 4
"""Midpoint steps of the maps per time step of the velocity (the velocity is constant over a
time step; sub-stepping makes the forward and backward flows of the same piecewise-linear
field inverse to each other to a few hundredths of a voxel)."""


def _lagrangian(velocities: Sequence[torch.Tensor], sign: float) -> torch.Tensor:
    """The displacement of the flow of ``sign · velocities`` in the given order: each point
    moves along the velocity sampled where it is (:data:`SUBSTEPS` midpoint steps per
    velocity); only the velocities are interpolated, never the accumulated map."""
    dt = sign / (len(velocities) * SUBSTEPS)
    u = torch.zeros_like(velocities[0])
    for v in velocities:
        for _ in range(SUBSTEPS):
            half = u + 0.5 * dt * warp(v, u, "linear", "border")
            u = u + dt * warp(v, half, "linear", "border")
    return u


def flow_maps(velocities: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Displacements of ``(φ_1⁻¹, φ_1)`` of the time-varying velocity ``velocities`` (equal
    time steps over ``[0, 1]``): ``φ_1`` flows points forward from ``t = 0``; ``φ_1⁻¹`` is the
    backward flow, from ``t = 1`` to 0 along ``−v``."""
    return backward_map(velocities), forward_map(velocities)


def backward_map(velocities: Sequence[torch.Tensor]) -> torch.Tensor:
    """Displacement of ``φ_1⁻¹`` (:func:`flow_maps`)."""
    if not len(velocities):
        raise ValueError("flow_maps: no velocities")
    return _lagrangian(list(velocities)[::-1], -1.0)


def forward_map(velocities: Sequence[torch.Tensor]) -> torch.Tensor:
    """Displacement of ``φ_1`` (:func:`flow_maps`)."""
    if not len(velocities):
        raise ValueError("flow_maps: no velocities")
    return _lagrangian(list(velocities), 1.0)


class TimeVaryingVelocityField(SpatialTransform):
    """``φ_1⁻¹`` of a time-varying velocity ``(T, N, D, *S)`` on ``grid`` (fixed → moving, the
    pull-back of the moving image); :meth:`inverse` is ``φ_1`` from the same flow."""

    def __init__(self, grid: Grid, velocities: torch.Tensor) -> None:
        super().__init__()
        if velocities.dim() != grid.ndim + 3 or tuple(velocities.shape[2:]) != (
            grid.ndim,
            *grid.shape,
        ):
            raise ValueError(
                f"velocities must be (T, N, {grid.ndim}, *{grid.shape}); got "
                f"{tuple(velocities.shape)}"
            )
        self.grid, self.ndim = grid, grid.ndim
        self._register_tensor("velocities", velocities, False)
        self._backward: torch.Tensor | None = None
        self._forward: torch.Tensor | None = None

    def backward_displacement(self) -> torch.Tensor:
        """Displacement of ``φ_1⁻¹`` (this transform) on :attr:`grid`, computed once."""
        if self._backward is None:
            self._backward = backward_map(self.velocities)
        return self._backward

    def forward_displacement(self) -> torch.Tensor:
        """Displacement of ``φ_1`` (the inverse) on :attr:`grid`, computed once."""
        if self._forward is None:
            self._forward = forward_map(self.velocities)
        return self._forward

    def maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Displacements of ``(φ_1⁻¹, φ_1)`` on :attr:`grid`."""
        return self.backward_displacement(), self.forward_displacement()

    def voxel_displacement(self, grid: Grid, batch: int | None = None) -> torch.Tensor:
        field = self.backward_displacement()
        return on_grid(self.grid, field, grid, batch, super().voxel_displacement)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return DisplacementField(self.grid, self.backward_displacement())(points)

    def inverse(self) -> DisplacementField:
        """``φ_1``: the forward flow of the same velocities."""
        return DisplacementField(self.grid, self.forward_displacement())


class GeodesicShooting(TimeVaryingVelocityField):
    """``φ_1⁻¹`` of the geodesic shot from an initial momentum ``(N, D, *S)`` on ``grid``.

    Args:
        grid: where the momentum lives (voxel units).
        momentum: ``m_0``.
        alpha, gamma, power: ``L = (−α∇² + γ)^c`` (:class:`DifferentialKernel`).
        steps: time steps of the shooting and of the maps.
        physical: the Laplacian of ``grid``'s spacing (``α`` in mm²) instead of its voxels.

    :meth:`energy` is the geodesic's squared length ``⟨m_0, K m_0⟩`` (mean over voxels, per
    pair), LDDMM's regularizer.
    """

    def __init__(
        self,
        grid: Grid,
        momentum: torch.Tensor,
        alpha: float = 2.0,
        gamma: float = 1.0,
        power: int = 2,
        steps: int = 10,
        physical: bool = False,
    ) -> None:
        check_field(momentum, "momentum")
        if momentum.shape[1] != grid.ndim or tuple(momentum.shape[2:]) != grid.shape:
            raise ValueError(
                f"momentum must be (N, {grid.ndim}, *{grid.shape}); got {tuple(momentum.shape)}"
            )
        spacing = grid.spacing if physical else None
        kernel = DifferentialKernel(grid.shape, alpha, gamma, power, spacing)
        super().__init__(grid, torch.stack(shoot(momentum, kernel, steps)))
        self.kernel, self.steps = kernel, int(steps)
        self.register_buffer("momentum", momentum)

    def energy(self) -> torch.Tensor:
        """``⟨m_0, K m_0⟩`` per pair ``(N,)``: mean over voxels of ``m_0 · v_0``."""
        return (self.momentum * self.velocities[0]).sum(1).flatten(1).mean(1)
