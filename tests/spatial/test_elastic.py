"""learnreg.spatial.elastic against independent facts of linear elasticity: the Navier–Cauchy
equation by finite differences, single Fourier modes (plane waves), Kelvin's free-space
solution of a point force, the incompressible limit, Betti's reciprocity and mirror symmetry;
and the random TRUS-probe loading cases (shapes, determinism, ranges, direction)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learnreg.spatial.differential import jacobian_determinant
from learnreg.spatial.elastic import (
    ProbeLoading,
    gland_geometry,
    lame_parameters,
    sample_probe_loading,
    solve_elastic,
    solve_periodic_elastic,
)

DT = torch.float64


def coords(shape, spacing, centre=None) -> torch.Tensor:
    """mm coordinates ``(D, *S)`` along the index axes (origin at ``centre``, default voxel 0)."""
    c = [0.0] * len(shape) if centre is None else centre
    axes = [
        (torch.arange(n, dtype=DT) - c0) * h for n, h, c0 in zip(shape, spacing, c, strict=True)
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def blob(shape, spacing, centre, sigma, direction) -> torch.Tensor:
    """A Gaussian force blob of unit total force along ``direction``, ``(1, D, *S)``."""
    x = coords(shape, spacing, centre)
    r2 = (x * x).sum(0)
    d = len(shape)
    g = torch.exp(-0.5 * r2 / sigma**2) / (2 * math.pi * sigma**2) ** (d / 2)
    return (torch.tensor(direction, dtype=DT).view(d, *[1] * d) * g)[None]


def navier_cauchy_fd(u: np.ndarray, spacing, lam: float, mu: float) -> np.ndarray:
    """``μ ∇²u + (λ + μ) ∇(∇·u)`` by second-order central differences on the interior
    (one voxel cut on every side), ``(D, *S − 2)``."""
    d = u.shape[0]
    inner = tuple(slice(1, -1) for _ in range(d))

    def shift(a, axis, k):
        return np.roll(a, -k, axis=axis)

    def d2(a, i, j):  # ∂²a / ∂x_i ∂x_j, central
        if i == j:
            return (shift(a, i, 1) - 2 * a + shift(a, i, -1)) / spacing[i] ** 2
        s = shift(shift(a, i, 1), j, 1) - shift(shift(a, i, 1), j, -1)
        s = s - shift(shift(a, i, -1), j, 1) + shift(shift(a, i, -1), j, -1)
        return s / (4 * spacing[i] * spacing[j])

    out = []
    for c in range(d):
        lap = sum(d2(u[c], i, i) for i in range(d))
        grad_div = sum(d2(u[j], c, j) for j in range(d))
        out.append((mu * lap + (lam + mu) * grad_div)[inner])
    return np.stack(out)


@pytest.mark.parametrize(
    ("shape", "spacing"), [((20, 18), (2.0, 2.6)), ((10, 12, 9), (2.4, 2.0, 3.0))]
)
def test_solution_satisfies_the_pde_by_finite_differences(shape, spacing) -> None:
    """A smooth, net-force-free load (two opposite blobs, σ 3.5 mm): the residual
    ``μ∇²u + (λ+μ)∇(∇·u) + f`` by central differences is a few % of max|f| on coarse voxels
    and falls at second order, ≥ 3× per halving of the voxel size (the stencil's error, not
    the solver's), everywhere but the outermost voxel layer. Measured max residual / max|f|
    at voxel sizes h, h/2, h/4: 2D 11.7 %, 3.0 %, 0.78 %; 3D 12.5 %, 3.4 %, 0.88 % (a
    deterministic test: no random numbers)."""
    d = len(shape)
    e, nu = 3.0, 0.45
    lam, mu = lame_parameters(e, nu)
    direction = [1.0, 0.5, -0.3][:d]
    rel = []
    for refine in (1, 2, 4):
        sh = [n * refine for n in shape]
        sp = [h / refine for h in spacing]
        c = [n / 2 for n in sh]
        a = [c0 - 3 * refine / 2 for c0 in c]
        b = [c0 + 3 * refine / 2 for c0 in c]
        f = blob(sh, sp, a, 3.5, direction) - blob(sh, sp, b, 3.5, direction)
        u = solve_elastic(f, sp, e, nu)
        op = navier_cauchy_fd(u[0].numpy(), sp, lam, mu)
        res = op + f[0].numpy()[(slice(None),) + (slice(1, -1),) * d]
        scale = np.abs(f.numpy()).max()
        rel.append(np.abs(res).max() / scale)
        assert np.abs(op).max() > 0.5 * scale  # the operator alone is of the size of f
    assert rel[0] < 0.15 and rel[1] < rel[0] / 3 and rel[2] < rel[1] / 3, rel
    assert rel[2] < 0.01, rel


@pytest.mark.parametrize("ndim", [2, 3])
def test_single_fourier_mode_has_the_plane_wave_amplitude(ndim: int) -> None:
    """On the periodic domain (pad 0) ``f = a cos(k·x)`` gives ``u = a cos(k·x) / ((λ+2μ)|k|²)``
    for a longitudinal wave (a ∥ k) and ``/ (μ |k|²)`` for a transverse one (a ⊥ k)."""
    shape = (16, 12, 10)[:ndim]
    spacing = (0.8, 1.5, 1.1)[:ndim]
    e, nu = 2.0, 0.3
    lam, mu = lame_parameters(e, nu)
    m = (2, 1, 3)[:ndim]  # wave numbers (periods per domain)
    k = torch.tensor(
        [2 * math.pi * mi / (n * h) for mi, n, h in zip(m, shape, spacing, strict=True)], dtype=DT
    )
    x = coords(shape, spacing)
    phase = torch.cos((k.view(ndim, *[1] * ndim) * x).sum(0))
    k2 = float(k @ k)
    perp = torch.zeros(ndim, dtype=DT)
    perp[0], perp[1] = -k[1], k[0]
    for a, modulus in ((k / k.norm(), lam + 2 * mu), (perp / perp.norm(), mu)):
        f = (a.view(ndim, *[1] * ndim) * phase)[None]
        u = solve_elastic(f, spacing, e, nu, pad=0)
        torch.testing.assert_close(u, f / (modulus * k2), atol=1e-12, rtol=1e-10)


def kelvin(x: torch.Tensor, force, mu: float, nu: float, sigma: float) -> torch.Tensor:
    """Kelvin's free-space displacement of a Gaussian blob of total force ``force`` (σ
    ``sigma``) at the origin, outside the blob: ``G + (σ²/2) ∇²G`` (exact there up to
    exponentially small terms: ``G`` is biharmonic away from the source). 3D:
    ``G_ij = [(3−4ν) δ_ij / r + x_i x_j / r³] / (16πμ(1−ν))``; 2D plane strain:
    ``[−(3−4ν) δ_ij ln r + x_i x_j / r²] / (8πμ(1−ν))``."""
    d = x.shape[0]
    view = (d, *[1] * d)
    fv = torch.tensor(force, dtype=DT).view(view)
    r = x.norm(dim=0).clamp_min(1e-9)
    xf = (x * fv).sum(0)
    if d == 3:
        g = (3 - 4 * nu) * fv / r + x * xf / r**3
        lap = 2 * fv / r**3 - 6 * x * xf / r**5
        return (g + 0.5 * sigma**2 * lap) / (16 * math.pi * mu * (1 - nu))
    g = -(3 - 4 * nu) * fv * torch.log(r) + x * xf / r**2
    lap = 2 * fv / r**2 - 4 * x * xf / r**4
    return (g + 0.5 * sigma**2 * lap) / (8 * math.pi * mu * (1 - nu))


@pytest.mark.parametrize(("ndim", "tolerance"), [(2, 0.06), (3, 0.06)])
def test_padding_approaches_kelvins_free_space_solution(ndim: int, tolerance: float) -> None:
    """A blob of unit force (σ 1.5 mm) in the middle of the FOV, compared with Kelvin's
    solution where r > 5σ, up to a uniform translation (the periodic images and the removed
    mean force shift the whole FOV: rigid, what a registration's affine absorbs). The
    deformation's error falls with the padding; with the default (the FOV's size on each
    side) it is within ``tolerance`` of |u| everywhere there. Measured, max (RMS) relative
    error, 3D 32³: pad 0: 44 % (19 %), 16: 14 % (3.7 %), 32 (default): 4.8 % (1.2 %),
    64: 1.1 % (0.27 %); 2D 64²: pad 0: 18 % (9.0 %), 32: 6.5 % (2.7 %), 64 (default): 3.1 %
    (1.2 %), 128: 1.1 % (0.45 %)."""
    n = 32 if ndim == 3 else 64
    shape, spacing, sigma, e, nu = (n,) * ndim, (1.0,) * ndim, 1.5, 1.0, 0.45
    _, mu = lame_parameters(e, nu)
    force = [1.0, 0.0, 0.0][:ndim]
    f = blob(shape, spacing, [n / 2] * ndim, sigma, force)
    x = coords(shape, spacing, [n / 2] * ndim)
    exact = kelvin(x, force, mu, nu, sigma)
    far = x.norm(dim=0) > 5 * sigma
    errors = {}
    for pad in (n // 2, None, 2 * n):
        diff = (solve_elastic(f, spacing, e, nu, pad=pad)[0] - exact)[:, far]
        diff = diff - diff.mean(1, keepdim=True)
        errors[pad] = float((diff.norm(dim=0) / exact[:, far].norm(dim=0)).max())
    assert errors[None] < tolerance, errors
    assert errors[2 * n] < errors[None] < errors[n // 2] < 0.2, errors


def _potential_force(shape, spacing, kind: str) -> torch.Tensor:
    """A smooth periodic force on the grid, curl-free (``∇g``) or divergence-free (``(∂₂g,
    −∂₁g, 0)``), of ``g`` a sum of a few low Fourier modes with random phases (analytic
    derivatives: exactly curl- or divergence-free on the periodic domain)."""
    d = len(shape)
    x = coords(shape, spacing)
    gen = torch.Generator().manual_seed(2)
    grad = torch.zeros_like(x)
    for _ in range(4):
        m = torch.randint(-2, 3, (d,), generator=gen)
        k = torch.tensor(
            [2 * math.pi * int(mi) / (n * h) for mi, n, h in zip(m, shape, spacing, strict=True)],
            dtype=DT,
        )
        phase = (k.view(d, *[1] * d) * x).sum(0) + 6.28 * float(torch.rand(1, generator=gen))
        grad = grad - k.view(d, *[1] * d) * torch.sin(phase)  # ∇ cos(k·x + φ)
    if kind == "curl-free":
        return grad[None]
    f = torch.zeros_like(x)
    f[0], f[1] = grad[1], -grad[0]
    return f[None]


@pytest.mark.parametrize("ndim", [2, 3])
def test_incompressible_limit_and_potential_forces(ndim: int) -> None:
    """A curl-free force only compresses: its response scales with ``1 / (λ + 2μ)`` and
    vanishes at ν = 0.5; a divergence-free force only shears: its response depends on μ
    alone (the same for any ν at equal μ). For a general force, ``∇·u`` → 0 as ν → 0.5."""
    shape = (24, 20, 22)[:ndim]
    spacing = (1.0, 1.2, 0.9)[:ndim]
    grad_f = _potential_force(shape, spacing, "curl-free")
    curl_f = _potential_force(shape, spacing, "divergence-free")
    u = {nu: solve_periodic_elastic(grad_f, spacing, 1.0, nu) for nu in (0.3, 0.45, 0.5)}
    lam3, mu3 = lame_parameters(1.0, 0.3)
    lam45, mu45 = lame_parameters(1.0, 0.45)
    ratio = (lam3 + 2 * mu3) / (lam45 + 2 * mu45)
    torch.testing.assert_close(u[0.45], ratio * u[0.3], rtol=1e-8, atol=1e-12)
    assert u[0.5].abs().max() < 1e-10 * u[0.3].abs().max()
    # shear: the same field at the same μ, whatever λ (E chosen to keep μ = 1)
    v1 = solve_periodic_elastic(curl_f, spacing, 2 * (1 + 0.1), 0.1)
    v2 = solve_periodic_elastic(curl_f, spacing, 2 * (1 + 0.499), 0.499)
    torch.testing.assert_close(v1, v2, rtol=1e-8, atol=1e-12)
    # a general force: relative divergence (spectral, on the periodic domain) → 0
    f = grad_f + curl_f
    k = [
        2 * math.pi * torch.fft.fftfreq(n, h, dtype=DT) for n, h in zip(shape, spacing, strict=True)
    ]
    kk = torch.stack(torch.meshgrid(*k, indexing="ij"))

    def relative_divergence(nu: float) -> float:
        w = torch.fft.fftn(
            solve_periodic_elastic(f, spacing, 1.0, nu)[0], dim=tuple(range(1, ndim + 1))
        )
        div = (kk * w).sum(0).abs().square().sum()
        grad = (kk.square().sum(0) * w.abs().square().sum(0)).sum()
        return float((div / grad).sqrt())

    values = [relative_divergence(nu) for nu in (0.3, 0.45, 0.49, 0.5)]
    assert values[0] > values[1] > values[2] > 1e3 * values[3], values
    assert values[0] > 0.1


@pytest.mark.parametrize("ndim", [2, 3])
def test_reciprocity_and_mirror_symmetry(ndim: int) -> None:
    """Betti's reciprocity ``⟨f₁, u(f₂)⟩ = ⟨f₂, u(f₁)⟩`` (the padded solver is a symmetric
    operator on the FOV), and a mirrored force gives the mirrored field with the mirrored
    component negated."""
    shape = (14, 12, 10)[:ndim]
    spacing = (1.0, 0.7, 1.4)[:ndim]
    gen = torch.Generator().manual_seed(3)
    f1 = torch.randn(1, ndim, *shape, generator=gen, dtype=DT)
    f2 = torch.randn(1, ndim, *shape, generator=gen, dtype=DT)
    u1, u2 = solve_elastic(f1, spacing, 1.0, 0.45), solve_elastic(f2, spacing, 1.0, 0.45)
    a, b = float((f1 * u2).sum()), float((f2 * u1).sum())
    assert abs(a - b) < 1e-10 * abs(a), (a, b)
    mirrored = f1.flip(2)
    mirrored[:, 0] *= -1
    expected = u1.flip(2)
    expected[:, 0] *= -1
    torch.testing.assert_close(
        solve_elastic(mirrored, spacing, 1.0, 0.45), expected, atol=1e-12, rtol=1e-9
    )


def test_solver_batches_materials_and_checks_inputs() -> None:
    f = torch.randn(2, 2, 12, 10, dtype=DT)
    both = solve_elastic(f, 1.0, torch.tensor([1.0, 2.0]), torch.tensor([0.3, 0.45]))
    torch.testing.assert_close(both[1:], solve_elastic(f[1:], 1.0, 2.0, 0.45))
    assert both.shape == f.shape
    with pytest.raises(ValueError, match="poisson_ratio"):
        solve_elastic(f, 1.0, 1.0, 0.6)
    with pytest.raises(ValueError, match="youngs_modulus"):
        solve_elastic(f, 1.0, 0.0, 0.3)
    with pytest.raises(ValueError, match="force must be"):
        solve_elastic(f[:, :1], 1.0)
    with pytest.raises(ValueError, match="spacing"):
        solve_elastic(f, (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="pad"):
        solve_elastic(f, 1.0, pad=-1)
    lam, mu = lame_parameters(1.0, 0.5)
    assert lam == math.inf and mu == pytest.approx(1 / 3)


# ---------------------------------------------------------------------- probe loading cases
@pytest.mark.parametrize(("shape", "spacing"), [((32, 40), (1.0, 0.8)), ((12, 16, 12), (1.6,) * 3)])
def test_probe_loading_cases(shape, spacing) -> None:
    """Shapes and dtype, peak |u| in the configured range, seeded determinism, the probe's
    push (tissue moves away from the posterior side: anteriorly on average), and smooth,
    nearly volume-preserving, fold-free fields (ν ∈ [0.40, 0.49])."""
    d = len(shape)
    loading = ProbeLoading(peak_displacement=(1.0, 3.0))
    u = sample_probe_loading(
        6, shape, spacing, radius=6.0, loading=loading, generator=torch.Generator().manual_seed(5)
    )
    assert u.shape == (6, d, *shape) and u.dtype == torch.float32
    peak = u.norm(dim=1).flatten(1).max(1).values
    assert bool(((peak > 1.0 - 1e-4) & (peak < 3.0 + 1e-4)).all()), peak
    assert peak.max() - peak.min() > 0.2  # random peaks, not one value
    again = sample_probe_loading(
        6, shape, spacing, radius=6.0, loading=loading, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(u, again)
    other = sample_probe_loading(
        6, shape, spacing, radius=6.0, loading=loading, generator=torch.Generator().manual_seed(6)
    )
    assert not torch.allclose(u, other)
    torch.manual_seed(1)  # the global generator by default
    g1 = sample_probe_loading(2, shape, spacing, radius=6.0)
    torch.manual_seed(1)
    torch.testing.assert_close(
        sample_probe_loading(2, shape, spacing, radius=6.0), g1, rtol=0, atol=0
    )
    # default posterior: −axis 1; the tissue is pushed along +axis 1 on average
    assert bool((u[:, 1].flatten(1).mean(1) > 0).all())
    det = jacobian_determinant(u.double(), spacing)
    assert det.min() > 0.8 and det.max() < 1.2, (det.min(), det.max())
    # another posterior direction: pushed the other way
    flipped = [0.0] * d
    flipped[1] = 1.0
    v = sample_probe_loading(
        6, shape, spacing, radius=6.0, posterior=flipped, generator=torch.Generator().manual_seed(5)
    )
    assert bool((v[:, 1].flatten(1).mean(1) < 0).all())


def test_probe_loading_is_centred_on_the_gland_and_checks_inputs() -> None:
    """The load sits next to the given gland centre: the largest displacements lie within
    a few radii of it (here: a gland in one corner of a large 2D FOV)."""
    shape, spacing = (64, 64), (1.0, 1.0)
    centre = torch.tensor([16.0, 20.0])
    u = sample_probe_loading(
        4, shape, spacing, centre=centre, radius=5.0, generator=torch.Generator().manual_seed(0)
    )
    mag = u.norm(dim=1).flatten(1)
    where = torch.stack(torch.unravel_index(mag.argmax(1), shape), 1).double()
    assert bool(((where - centre).norm(dim=1) < 3 * 1.6 * 5.0).all()), where
    with pytest.raises(ValueError, match="peak_displacement"):
        ProbeLoading(peak_displacement=(3.0, 1.0))
    with pytest.raises(ValueError, match="poisson_ratio"):
        ProbeLoading(poisson_ratio=(0.4, 0.6))
    with pytest.raises(ValueError, match="probe_angle"):
        ProbeLoading(probe_angle=200.0)
    with pytest.raises(ValueError, match="radius"):
        sample_probe_loading(1, shape, spacing, radius=0.0)
    with pytest.raises(ValueError, match="posterior"):
        sample_probe_loading(1, shape, spacing, posterior=(0.0, 0.0))
    with pytest.raises(ValueError, match="2D or 3D"):
        sample_probe_loading(1, (8,), 1.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_gland_geometry(ndim: int) -> None:
    """Centroid (voxels) and equivalent radius (mm) of a ball mask; an empty mask falls back
    to the grid centre and a quarter of the smallest extent."""
    shape = (30, 26, 28)[:ndim]
    spacing = (0.8, 0.8, 0.8)[:ndim]
    centre = torch.tensor([12.0, 14.0, 11.0][:ndim], dtype=DT)
    x = coords(shape, (1.0,) * ndim, centre.tolist())
    ball = ((x * x).sum(0) <= 7.0**2).to(torch.float32)
    c, r = gland_geometry(torch.stack([ball, torch.zeros_like(ball)]), spacing)
    torch.testing.assert_close(c[0], centre)
    assert r[0] == pytest.approx(7.0 * 0.8, rel=0.03)
    torch.testing.assert_close(c[1], (torch.tensor(shape, dtype=DT) - 1) / 2)
    assert float(r[1]) == pytest.approx(0.25 * (min(shape) - 1) * 0.8)
