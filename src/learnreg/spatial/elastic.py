"""Linear-elastic displacements by FFT, and random TRUS-probe loading cases (2D and 3D).

**Why.** Hu et al. (MICCAI 2018) regularize a registration network adversarially: a
discriminator learns to tell the network's dense displacements (DDFs) from finite-element (FE)
simulations of the prostate's motion under the transrectal ultrasound (TRUS) probe
(patient-specific meshes from MR segmentations, varied material parameters and probe
placements). No such simulations exist here, so this module provides the closest reference
that needs no mesh: displacements of a homogeneous, isotropic, linear-elastic medium loaded
by the probe, i.e. solutions of the Navier–Cauchy equation

    μ ∇²u + (λ + μ) ∇(∇·u) + f = 0,    μ = E / (2 (1 + ν)),  λ = E ν / ((1 + ν)(1 − 2ν)),

for body forces ``f`` (force per volume; ``E`` in kPa and ``f`` in kPa/mm give ``u`` in mm).
Such fields have the structure the paper wanted its network to learn: smooth, nearly
volume-preserving for soft tissue (ν ≈ 0.45–0.5), large near the load and decaying away from it.

**What it is not.** No FE mesh and no organ boundary: one infinite (padded periodic) medium
with the same material everywhere — no gland / surrounding-tissue contrast, no bone, no
anisotropy; no contact mechanics — the probe is a prescribed Gaussian pressure blob, not a
rigid body pressing on the rectal wall; small strains (linear elasticity), so large probe
displacements are only approximately right.

**Spectral solution.** In Fourier space, with ``k`` the angular wave vector (per mm) and
``P = k kᵀ / |k|²`` the projection onto it, the equation reads
``(μ |k|² I + (λ + μ) k kᵀ) û = f̂``, whose inverse is

    û = (I − P / (2 (1 − ν))) f̂ / (μ |k|²)

(longitudinal waves have modulus ``λ + 2μ``, transverse ones ``μ``; at ν = 0.5, the
incompressible limit, the longitudinal part vanishes and ``∇·u = 0``). The continuous symbol
is used, so a force that is a band-limited trigonometric polynomial on the domain is solved
exactly, and smooth forces with spectral accuracy. The FFT makes the domain periodic: the
field of view (FOV) is therefore embedded in a larger periodic domain, padded on each side by
``pad`` voxels (default: the FOV's own size, a domain of 3× the FOV along each axis), with zero
force in the padding, and the solution cropped back. The mean of the force over the domain
(``k = 0``) has no periodic solution and is removed (a uniform counter-force spread over the
whole padded domain; the solution has zero mean over it). What periodicity still leaves in
the FOV is a near-uniform translation plus a smooth correction that falls with the padding:
against Kelvin's free-space solution of a point force in the middle of the FOV, the field
minus a uniform translation is within 4.8 % (3D) / 3.1 % (2D) of |u| everywhere beyond 5 σ of
the load with the default padding (14 % / 6.5 % with half of it;
``tests/spatial/test_elastic.py``). 2D is plane strain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from learnreg.spatial.filters import gaussian_blur

__all__ = [
    "ProbeLoading",
    "gland_geometry",
    "lame_parameters",
    "sample_probe_loading",
    "solve_elastic",
    "solve_periodic_elastic",
]


def lame_parameters(youngs_modulus: float | Tensor, poisson_ratio: float | Tensor):
    """Lamé's ``(λ, μ)`` of Young's modulus ``E`` and Poisson's ratio ``ν`` (``λ`` is
    infinite at ν = 0.5)."""
    e, nu = youngs_modulus, poisson_ratio
    mu = e / (2 * (1 + nu))
    lam = e * nu / ((1 + nu) * (1 - 2 * nu)) if not _is(nu, 0.5) else math.inf
    return lam, mu


def _is(value: float | Tensor, target: float) -> bool:
    return bool(torch.all(torch.as_tensor(value) == target))


def _per_axis(name: str, value: float | Sequence[float], d: int) -> list[float]:
    vals = [float(value)] * d if isinstance(value, int | float) else [float(v) for v in value]
    if len(vals) != d:
        raise ValueError(f"{name} must be a number or {d} numbers (one per axis), got {value!r}")
    return vals


def _material(
    youngs_modulus: float | Tensor, poisson_ratio: float | Tensor, n: int, ref: Tensor
) -> tuple[Tensor, Tensor]:
    """``E`` and ``ν`` as ``(N,)`` tensors in ``ref``'s dtype/device, checked."""
    e = torch.as_tensor(youngs_modulus, dtype=ref.dtype, device=ref.device).expand(n)
    nu = torch.as_tensor(poisson_ratio, dtype=ref.dtype, device=ref.device).expand(n)
    if not bool(torch.all(e > 0)):
        raise ValueError(f"youngs_modulus must be > 0, got {youngs_modulus}")
    if not bool(torch.all((nu > -1) & (nu <= 0.5))):
        raise ValueError(f"poisson_ratio must be in (-1, 0.5], got {poisson_ratio}")
    return e, nu


def _check_force(force: Tensor) -> int:
    d = force.dim() - 2
    if d not in (2, 3) or force.shape[1] != d or not force.is_floating_point():
        raise ValueError(
            f"force must be a float (N, D, *S) field with D = 2 or 3 spatial dims, got "
            f"{tuple(force.shape)} {force.dtype}"
        )
    return d


def solve_periodic_elastic(
    force: Tensor,
    spacing: float | Sequence[float] = 1.0,
    youngs_modulus: float | Tensor = 1.0,
    poisson_ratio: float | Tensor = 0.45,
) -> Tensor:
    """Displacement ``(N, D, *S)`` (mm along the index axes) of a periodic linear-elastic
    medium under the body force ``force (N, D, *S)`` sampled on the whole periodic domain.

    ``spacing`` is the voxel size in mm per index axis; ``youngs_modulus`` and
    ``poisson_ratio`` are numbers or ``(N,)`` tensors (one material per field; ν in
    (−1, 0.5]). The force's mean is removed (``k = 0``, see the module docstring).
    """
    d = _check_force(force)
    sp = _per_axis("spacing", spacing, d)
    if min(sp) <= 0:
        raise ValueError(f"spacing must be > 0, got {spacing!r}")
    n, shape = force.shape[0], force.shape[2:]
    e, nu = _material(youngs_modulus, poisson_ratio, n, force)
    dims = tuple(range(2, d + 2))
    f_hat = torch.fft.rfftn(force, dim=dims)
    kw = {"dtype": force.dtype, "device": force.device}
    ks, odd = [], []  # k per axis; k with the Nyquist frequency zeroed (first derivatives)
    for axis, (m, h) in enumerate(zip(shape, sp, strict=True)):
        freq = (torch.fft.rfftfreq if axis == d - 1 else torch.fft.fftfreq)(m, h, **kw)
        view = [1] * d
        view[axis] = -1
        k = (2 * math.pi * freq).view(view)
        ks.append(k)
        odd.append(k.masked_fill(k.abs() * h >= math.pi * (1 - 1e-9), 0) if m % 2 == 0 else k)
    k2 = sum(k * k for k in ks).expand(f_hat.shape[2:]).clone()
    zero = k2 == 0
    k2[zero] = 1.0
    mu = (e / (2 * (1 + nu))).view(n, *[1] * d)
    c = (1 / (2 * (1 - nu))).view(n, *[1] * d)
    # P f̂ with P_ij = k_i k_j / |k|²: ∂_i ∂_j's symbol is k_i² on the diagonal (even) and
    # the product of first-derivative symbols off it, which vanish at the Nyquist frequency
    # of an even axis (its sign is ambiguous there; keeps the operator mirror symmetric)
    k_dot_f = sum(k * f_hat[:, i] for i, k in enumerate(odd))
    u_hat = torch.stack(
        [
            f_hat[:, i] - c * (q * k_dot_f + (k * k - q * q) * f_hat[:, i]) / k2
            for i, (k, q) in enumerate(zip(ks, odd, strict=True))
        ],
        1,
    )
    u_hat = (u_hat / (mu * k2).unsqueeze(1)).masked_fill(zero, 0)
    return torch.fft.irfftn(u_hat, s=shape, dim=dims)


def _pad_sizes(pad: int | Sequence[int] | None, shape: Sequence[int]) -> list[int]:
    if pad is None:
        return [int(s) for s in shape]
    p = [int(pad)] * len(shape) if isinstance(pad, int) else [int(v) for v in pad]
    if len(p) != len(shape) or min(p) < 0:
        raise ValueError(
            f"pad must be a voxel count >= 0 or one per axis ({len(shape)}), got {pad!r}"
        )
    return p


def solve_elastic(
    force: Tensor,
    spacing: float | Sequence[float] = 1.0,
    youngs_modulus: float | Tensor = 1.0,
    poisson_ratio: float | Tensor = 0.45,
    pad: int | Sequence[int] | None = None,
) -> Tensor:
    """Displacement ``(N, D, *S)`` (mm along the index axes) of the field of view of an
    (approximately) unbounded linear-elastic medium under ``force (N, D, *S)`` given on the
    FOV (zero outside it): :func:`solve_periodic_elastic` on the FOV padded by ``pad`` voxels
    on each side (default: each axis by its own size), cropped back."""
    d = _check_force(force)
    shape = force.shape[2:]
    p = _pad_sizes(pad, shape)
    padded = torch.nn.functional.pad(force, [v for q in reversed(p) for v in (q, q)])
    u = solve_periodic_elastic(padded, spacing, youngs_modulus, poisson_ratio)
    for axis in range(d):
        u = u.narrow(axis + 2, p[axis], shape[axis])
    return u


@dataclass(frozen=True)
class ProbeLoading:
    """Ranges of the random TRUS-probe loading cases of :func:`sample_probe_loading`; every
    ``(low, high)`` is sampled uniformly per case. Lengths relative to the gland radius ``R``
    (the equivalent sphere's; so the cases scale with the organ), displacements in mm.

    Attributes:
        peak_displacement: peak |u| over the field of view (mm). The equation is linear, so
            the field is scaled to it: ``E`` then only sets the force needed, not the shape.
        poisson_ratio: ν of the medium (soft tissue ≈ 0.45; 0.5 is incompressible).
        probe_angle: the probe lies within this angle (degrees) of the posterior direction,
            seen from the gland centre (a cone in 3D, a fan in 2D).
        probe_distance: distance of the pressure blob's centre from the gland centre (× R).
        probe_width: σ of the Gaussian pressure blob (× R).
        body_force: amplitude of the smooth random body forces, relative to the probe
            force's peak (0: none).
        body_smoothness: σ of the Gaussian smoothing of their white noise (× R).

    The default peak, 1–3 mm, is chosen for the shared MR–TRUS data, whose glands have
    equivalent radii of 4.8–8.3 mm (median 5.8) in their header millimetres: 15–50 % of R,
    a probe push of a few mm on a real prostate of twice that size. Not fitted to any
    registration result.
    """

    peak_displacement: tuple[float, float] = (1.0, 3.0)
    poisson_ratio: tuple[float, float] = (0.40, 0.49)
    probe_angle: float = 30.0
    probe_distance: tuple[float, float] = (1.0, 1.6)
    probe_width: tuple[float, float] = (0.4, 0.8)
    body_force: float = 0.1
    body_smoothness: float = 0.5

    def __post_init__(self) -> None:
        ranges = {
            "peak_displacement": (self.peak_displacement, 0.0, math.inf),
            "poisson_ratio": (self.poisson_ratio, -1.0, 0.5),
            "probe_distance": (self.probe_distance, 0.0, math.inf),
            "probe_width": (self.probe_width, 0.0, math.inf),
        }
        for name, (r, lo, hi) in ranges.items():
            if len(r) != 2 or not lo < float(r[0]) <= float(r[1]) <= hi:
                raise ValueError(
                    f"ProbeLoading.{name} must be (low, high) with {lo} < low <= high <= {hi}, "
                    f"got {r!r}"
                )
        if not 0 <= self.probe_angle <= 180:
            raise ValueError(
                f"ProbeLoading.probe_angle must be in [0, 180], got {self.probe_angle}"
            )
        if self.body_force < 0 or self.body_smoothness <= 0:
            raise ValueError(
                f"ProbeLoading: need body_force >= 0 and body_smoothness > 0, got "
                f"{self.body_force}, {self.body_smoothness}"
            )


def _uniform(r: tuple[float, float], n: int, generator: torch.Generator | None) -> Tensor:
    lo, hi = float(r[0]), float(r[1])
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def _cone(axis: Tensor, degrees: float, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` unit vectors uniform within ``degrees`` of the unit vector ``axis`` (on the
    spherical cap in 3D, the arc in 2D), ``(n, D)`` float64."""
    a = math.radians(degrees)
    if axis.numel() == 2:
        theta = (2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1) * a
        perp = torch.stack([-axis[1], axis[0]]).expand(n, 2)
    else:
        cos = 1 - torch.rand(n, generator=generator, dtype=torch.float64) * (1 - math.cos(a))
        theta = torch.acos(cos.clamp(-1, 1))
        q = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        perp = q - (q @ axis)[:, None] * axis
        perp = perp / perp.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.cos(theta)[:, None] * axis + torch.sin(theta)[:, None] * perp


def _default_gland(shape: Sequence[int], sp: Tensor) -> tuple[Tensor, float]:
    """The grid centre (voxel indices) and a quarter of the FOV's smallest extent (mm)."""
    size = torch.tensor([int(s) for s in shape], dtype=torch.float64)
    return (size - 1) / 2, 0.25 * float(((size - 1) * sp).min())


def gland_geometry(mask: Tensor, spacing: float | Sequence[float] = 1.0) -> tuple[Tensor, Tensor]:
    """Centres ``(N, D)`` (voxel indices, float64) and equivalent radii ``(N,)`` (mm: of the
    sphere, or in 2D the disc, of the same volume) of soft masks ``(N, *S)``, for
    :func:`sample_probe_loading`. An empty mask gets that function's defaults (the grid
    centre, a quarter of the smallest extent of the FOV)."""
    d = mask.dim() - 1
    if d not in (2, 3):
        raise ValueError(
            f"gland_geometry: masks must be (N, *S), 2D or 3D; got {tuple(mask.shape)}"
        )
    sp = torch.tensor(_per_axis("spacing", spacing, d), dtype=torch.float64)
    m = mask.detach().to(device="cpu", dtype=torch.float64).clamp_min(0)
    total = m.flatten(1).sum(1)
    centre, radius = _default_gland(m.shape[1:], sp)
    centres = centre.expand(m.shape[0], d).clone()
    radii = torch.full((m.shape[0],), radius, dtype=torch.float64)
    ok = total > 0
    for axis in range(d):
        other = [a + 1 for a in range(d) if a != axis]
        profile = m.sum(other) if other else m
        idx = torch.arange(m.shape[axis + 1], dtype=torch.float64)
        centres[ok, axis] = (profile[ok] * idx).sum(1) / total[ok]
    volume = total * float(sp.prod())
    eq = (3 * volume / (4 * math.pi)) ** (1 / 3) if d == 3 else (volume / math.pi).sqrt()
    radii[ok] = eq[ok]
    return centres, radii


def sample_probe_loading(
    n: int,
    shape: Sequence[int],
    spacing: float | Sequence[float] = 1.0,
    centre: Tensor | None = None,
    radius: Tensor | float | None = None,
    posterior: Sequence[float] | None = None,
    loading: ProbeLoading | None = None,
    pad: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` random displacements ``(n, D, *shape)`` (mm along the index axes) of the tissue
    under a TRUS probe: the forward motion ``X → X + u(X)`` of the medium, loaded by

    * a localized pressure: a Gaussian force blob (σ ``probe_width`` × R) centred
      ``probe_distance`` × R from the gland centre, in a random direction within
      ``probe_angle`` of ``posterior``, pushing towards the gland centre;
    * small smooth random body forces (white noise smoothed by σ ``body_smoothness`` × R,
      peak ``body_force`` × the blob's);

    solved by :func:`solve_periodic_elastic` with a random ν, forces evaluated on the whole
    padded domain (the blob is not cut off at the FOV), cropped to the FOV and scaled to a
    random peak displacement (``loading``, :class:`ProbeLoading`).

    Args:
        n: number of cases.
        shape: the field of view's grid size (2D or 3D).
        spacing: voxel size (mm) per index axis.
        centre: gland centres ``(n, D)`` or ``(D,)`` in voxel indices (default: the grid
            centre).
        radius: gland radii ``(n,)`` or one number, mm (default: a quarter of the smallest
            extent of the FOV).
        posterior: direction of the probe from the gland along the index axes (default
            ``−axis 1``, posterior on a RAS-oriented grid).
        pad: voxels of padding per side (default: each axis by its own size).
        generator: random numbers (default torch's global generator).
    """
    d = len(shape)
    if d not in (2, 3) or min(int(s) for s in shape) < 2 or n < 1:
        raise ValueError(f"need n >= 1 and a 2D or 3D shape of sizes >= 2, got {n}, {shape!r}")
    shape = tuple(int(s) for s in shape)
    loading = ProbeLoading() if loading is None else loading
    sp = torch.tensor(_per_axis("spacing", spacing, d), dtype=torch.float64)
    if bool((sp <= 0).any()):
        raise ValueError(f"spacing must be > 0, got {spacing!r}")
    default_centre, default_radius = _default_gland(shape, sp)
    c = default_centre if centre is None else torch.as_tensor(centre, dtype=torch.float64).cpu()
    c = c.reshape(-1, d).expand(n, d) * sp
    if radius is None:
        radius = default_radius
    r = torch.as_tensor(radius, dtype=torch.float64).cpu().reshape(-1).expand(n)
    if not bool((r > 0).all()):
        raise ValueError(f"radius must be > 0 mm, got {radius!r}")
    p = torch.zeros(d, dtype=torch.float64)
    if posterior is None:
        p[1] = -1.0
    else:
        p = torch.tensor(_per_axis("posterior", posterior, d), dtype=torch.float64)
    if float(p.norm()) == 0:
        raise ValueError("posterior must be a non-zero direction")
    p = p / p.norm()

    direction = _cone(p, loading.probe_angle, n, generator)
    probe = c + (_uniform(loading.probe_distance, n, generator) * r)[:, None] * direction
    width = _uniform(loading.probe_width, n, generator) * r
    nu = _uniform(loading.poisson_ratio, n, generator)
    peak = _uniform(loading.peak_displacement, n, generator)

    pads = _pad_sizes(pad, shape)
    kw = {"dtype": dtype, "device": device}
    big = tuple(s + 2 * q for s, q in zip(shape, pads, strict=True))
    one = [1] * d
    dist2 = torch.zeros(n, *big, **kw)
    for i in range(d):
        view = [1, *one]
        view[i + 1] = -1
        a = (torch.arange(big[i], **kw) - pads[i]) * float(sp[i])  # mm, FOV voxel 0 at 0
        dist2 = dist2 + (a.view(view) - probe[:, i].to(**kw).view(n, *one)) ** 2
    blob = torch.exp(-0.5 * dist2 / (width**2).to(**kw).view(n, *one))
    force = -direction.to(**kw).view(n, d, *one) * blob[:, None]  # towards the gland
    if loading.body_force > 0:
        noise = torch.randn(n, d, *big, generator=generator, dtype=dtype).to(device)
        for j in range(n):
            sigma = [float(loading.body_smoothness * r[j] / h) for h in sp]
            smooth = gaussian_blur(noise[j : j + 1], sigma)[0]
            top = smooth.square().sum(0).max().sqrt().clamp_min(1e-12)
            force[j] += loading.body_force * smooth / top
    u = solve_periodic_elastic(force, sp.tolist(), 1.0, nu.to(**kw))
    for axis in range(d):
        u = u.narrow(axis + 2, pads[axis], shape[axis])
    top = u.square().sum(1).flatten(1).max(1).values.sqrt().clamp_min(1e-12)
    return u * (peak.to(**kw) / top).view(n, *one, 1)
