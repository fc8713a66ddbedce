"""LDDMM shooting against independent references: the finite-difference operator, the
adjoint identity of EPDiff, conserved energy, analytic translations, scaling and squaring,
and numerical gradients."""

from __future__ import annotations

import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.spatial.fields import compose_displacements
from learnreg.spatial.lddmm import (
    DifferentialKernel,
    GeodesicShooting,
    TimeVaryingVelocityField,
    epdiff,
    flow_maps,
    shoot,
)
from learnreg.spatial.svf import integrate_velocity


def _bumps(shape, ndim, seed=0, width=None, amplitude=1.0, dtype=torch.float64) -> torch.Tensor:
    """A smooth field ``(1, D, *S)``: a few Gaussian bumps well inside the grid."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in shape], indexing="ij")
    width = width or min(shape) / 8
    out = torch.zeros(1, ndim, *shape, dtype=dtype)
    for _ in range(3):
        c = [n / 4 + torch.rand((), generator=g).item() * n / 2 for n in shape]
        r2 = sum((a - ci) ** 2 for a, ci in zip(axes, c, strict=True))
        bump = torch.exp(-r2 / (2 * width**2))
        for a, n in zip(axes, shape, strict=True):  # vanishing smoothly at the border
            bump = bump * torch.sin(torch.pi * a / (n - 1)) ** 2
        w = torch.randn(ndim, generator=g, dtype=dtype)
        out[0] += amplitude * w.view(-1, *([1] * ndim)) * bump
    return out


def _periodic_laplacian(f: torch.Tensor) -> torch.Tensor:
    d = f.dim() - 2
    return sum(torch.roll(f, 1, a) + torch.roll(f, -1, a) - 2 * f for a in range(2, 2 + d))


@pytest.mark.parametrize("ndim", [2, 3])
def test_kernel_is_the_finite_difference_operator_and_its_inverse(ndim) -> None:
    shape = (12, 10, 8)[:ndim]
    k = DifferentialKernel(shape, alpha=1.5, gamma=0.7, power=2)
    v = torch.randn(2, ndim, *shape, dtype=torch.float64)
    want = v
    for _ in range(2):
        want = -1.5 * _periodic_laplacian(want) + 0.7 * want
    torch.testing.assert_close(k.operator(v), want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(k.smooth(k.operator(v)), v, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="alpha"):
        DifferentialKernel(shape, alpha=0.0)
    with pytest.raises(ValueError, match="kernel of"):
        k.smooth(torch.zeros(1, ndim, *(4,) * ndim))


@pytest.mark.parametrize("ndim", [2, 3])
def test_epdiff_is_the_adjoint_of_the_lie_bracket(ndim) -> None:
    """⟨ad*_v m, w⟩ = ⟨m, Dv·w − Dw·v⟩ for fields vanishing at the border (integration by
    parts), with ``epdiff = −ad*``; the bracket by central differences of scipy-free torch."""
    shape = (64, 64) if ndim == 2 else (40, 40, 40)
    m, v, w = (_bumps(shape, ndim, seed=s, width=min(shape) / 5) for s in (1, 2, 3))
    lhs = -(epdiff(m, v) * w).sum()

    def jac(f):
        return torch.stack(torch.gradient(f, dim=tuple(range(2, 2 + ndim))), dim=2)

    bracket = (jac(v) * w.unsqueeze(1)).sum(2) - (jac(w) * v.unsqueeze(1)).sum(2)
    rhs = (m * bracket).sum()
    scale = float((epdiff(m, v).abs() * w.abs()).sum())  # the terms nearly cancel
    assert abs(float(lhs - rhs)) < 5e-3 * scale, (float(lhs), float(rhs), scale)  # O(h²)


def test_shooting_conserves_the_energy() -> None:
    """Along a geodesic ⟨m_t, K m_t⟩ is constant."""
    shape = (48, 48)
    k = DifferentialKernel(shape, alpha=4.0, gamma=1.0, power=2)
    m0 = _bumps(shape, 2, seed=4, amplitude=8.0)
    vs = shoot(m0, k, steps=20)
    assert float(vs[0].abs().max()) > 3.0  # a large deformation, not a linear regime
    energies = [float((k.operator(v) * v).sum()) for v in vs]
    assert max(energies) / min(energies) - 1 < 5e-3, energies  # measured 0.12 %


@pytest.mark.parametrize("ndim", [2, 3])
def test_constant_momentum_is_a_translation(ndim) -> None:
    shape = (10, 9, 8)[:ndim]
    grid = Grid(shape)
    shift = torch.tensor([0.6, -0.3, 0.2][:ndim], dtype=torch.float64)
    gamma, power = 2.0, 2
    m0 = (shift * gamma**power).view(1, ndim, *([1] * ndim)).expand(1, ndim, *shape).clone()
    t = GeodesicShooting(grid, m0, alpha=3.0, gamma=gamma, power=power, steps=5)
    want = shift.view(1, ndim, *([1] * ndim)).expand(1, ndim, *shape)
    inner = (slice(None), slice(None)) + (slice(2, -2),) * ndim  # border padding aside
    torch.testing.assert_close(t.voxel_displacement(grid)[inner], -want[inner])
    torch.testing.assert_close(t.inverse().voxel_field()[inner], want[inner])
    assert float(t.energy()) == pytest.approx(float((shift**2).sum()) * gamma**power)


@pytest.mark.parametrize("ndim", [2, 3])
def test_forward_and_backward_maps_are_inverse(ndim) -> None:
    shape = (40, 40, 32)[:ndim]
    grid = Grid(shape)
    m0 = _bumps(shape, ndim, seed=5, amplitude=8.0)
    t = GeodesicShooting(grid, m0, alpha=4.0, steps=20)
    back, fwd = t.maps()
    size = float(back.norm(dim=1).max())
    assert size > 2.0
    for a, b in ((back, fwd), (fwd, back)):
        err = compose_displacements(a, b).norm(dim=1).max()
        assert float(err) < 0.03 * size, (float(err), size)  # measured 0.7–1.9 %


def test_stationary_velocity_flows_like_scaling_and_squaring() -> None:
    """A constant-in-time velocity: the flow is exp(v), the backward map exp(−v)."""
    shape = (48, 40)
    v = _bumps(shape, 2, seed=6, amplitude=3.0, width=6.0)
    back, fwd = flow_maps([v] * 64)
    tol = 0.015 * float(v.norm(dim=1).max())  # measured 1 % (time steps, interpolation)
    torch.testing.assert_close(fwd, integrate_velocity(v, 10), atol=tol, rtol=0)
    torch.testing.assert_close(back, integrate_velocity(-v, 10), atol=tol, rtol=0)
    t = TimeVaryingVelocityField(Grid(shape), torch.stack([v] * 64))
    torch.testing.assert_close(t.voxel_displacement(Grid(shape)), back)
    with pytest.raises(ValueError, match="velocities must be"):
        TimeVaryingVelocityField(Grid(shape), v)


def test_shooting_gradient_matches_finite_differences() -> None:
    grid = Grid((7, 6))
    m0 = _bumps((7, 6), 2, seed=7, amplitude=0.5, width=1.5).requires_grad_(True)

    def f(m):
        return GeodesicShooting(grid, m, alpha=1.0, steps=2).voxel_displacement(grid)

    assert torch.autograd.gradcheck(f, (m0,), eps=1e-6, atol=1e-6)


def test_bad_momentum_is_refused() -> None:
    with pytest.raises(ValueError, match="momentum must be"):
        GeodesicShooting(Grid((8, 8)), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="steps"):
        shoot(torch.zeros(1, 2, 8, 8), DifferentialKernel((8, 8)), steps=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_zero_momentum_is_the_identity(ndim) -> None:
    grid = Grid((8, 10, 6)[:ndim])
    t = GeodesicShooting(grid, torch.zeros(1, ndim, *grid.shape), steps=3)
    assert float(t.voxel_displacement(grid).abs().max()) == 0.0
    assert float(t.inverse().voxel_field().abs().max()) == 0.0
    assert float(t.energy()) == 0.0


def test_kernel_with_spacing_is_the_physical_laplacian() -> None:
    """Anisotropic voxels: each axis's second difference divided by its spacing²."""
    shape, spacing = (12, 10), (2.0, 0.5)
    k = DifferentialKernel(shape, alpha=1.5, gamma=0.7, power=1, spacing=spacing)
    v = torch.randn(1, 2, *shape, dtype=torch.float64)
    lap = sum(
        (torch.roll(v, 1, 2 + a) + torch.roll(v, -1, 2 + a) - 2 * v) / h**2
        for a, h in enumerate(spacing)
    )
    torch.testing.assert_close(k.operator(v), -1.5 * lap + 0.7 * v, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="spacing"):
        DifferentialKernel(shape, spacing=(1.0,))
