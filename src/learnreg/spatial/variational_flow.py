"""DeepFlow's variational optical flow: data, smoothness and matching terms, coarse to fine.

Weinzaepfel et al., "DeepFlow: large displacement optical flow with deep matching", ICCV
2013, Sec. 4, after Brox et al. (ECCV 2004) and Brox & Malik (PAMI 2011). The flow ``w``
maps the fixed image ``I₁`` to the moving image ``I₂``, ``I₁(x) ≈ I₂(x + w(x))``, and
minimizes ``E(w) = ∫ E_D + α(x) E_S + β E_M dx`` with the robust penalty
``Ψ(s²) = √(s² + ε²)``:

- **data**: ``E_D = δ' Ψ(θ₀ (I₂(x+w) − I₁(x))²) + γ' Ψ(Σ_d θ_d (∂_d I₂(x+w) − ∂_d I₁(x))²)``
  (``δ' = δ/6``, ``γ' = γ/6``: :data:`DATA_SCALE`),
  brightness and gradient constancy, each normalized by ``θ = 1 / (|∇·|² + ζ²)`` of its
  (linearized) constraint (Zimmer et al.; DeepFlow's "normalized" data term);
- **smoothness**: ``E_S = Ψ(Σ_d |∇w_d|²)`` with the local weight
  ``α(x) = α · exp(−κ |∇I₁|)`` (``κ = 5`` on intensities in ``[0, 1]``);
- **matching**: ``E_M = c(x) φ(x) Ψ(|w − w'|²)``: the flow is pulled towards the matches
  ``w'`` where there are some, weighted by their score ``c`` and spread over their patch
  and a Gaussian neighbourhood ``φ`` (:func:`match_field`).

It is minimized coarse to fine (downscaling ``η``, down to ``min_size`` voxels): at every
level the moving image is warped once by the current flow, then ``fixed_point_iterations``
lagged-nonlinearity iterations each solve the linearized Euler–Lagrange equations for the
increment ``dw`` with ``sor_iterations`` red-black successive over-relaxation sweeps
(``ω``), as DeepFlow's code. Works for 2D and 3D images (voxel units on the index grid);
where ``x + w`` leaves the moving image the data term is switched off.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from learnreg.core.errors import InputError
from learnreg.spatial.differential import spatial_gradient
from learnreg.spatial.fields import resize_displacement, resize_linear
from learnreg.spatial.filters import gaussian_blur
from learnreg.spatial.sampling import warp

__all__ = ["DATA_SCALE", "VariationalFlowConfig", "match_field", "variational_flow"]

DATA_SCALE = 1 / 6
"""The data terms weigh ``δ · DATA_SCALE`` and ``γ · DATA_SCALE`` against ``α``: OpenCV's
DeepFlow passes ``4α, δ/3, γ/3`` to its variational refinement (whose own discretization
weighs the smoothness by 1/4 and the data terms by 1/2, as DeepFlow's C code), so for
grey-level images its effective weights are ``α, δ/6, γ/6``. Measured on a real ants2d slice
under a known 2-pixel warp (``tests/methods/test_deepflow.py``'s protocol, r16, seed 0,
128×128, no matches): EPE 0.056 px with this scale, 0.28 px with the weights unscaled, 0.046
px for OpenCV."""


@dataclass
class VariationalFlowConfig:
    """Weights and solver settings (defaults: DeepFlow's, as OpenCV's implementation, on
    intensities scaled to ``[0, 255]``).

    Args:
        alpha: smoothness weight α.
        beta: matching weight β (0: no matching term).
        gamma: gradient-constancy weight γ.
        delta: brightness-constancy weight δ.
        kappa: local smoothness weight ``exp(−κ |∇I₁|)`` (``|∇I₁|`` on ``[0, 1]``; 0: none).
        sigma: Gaussian pre-smoothing of the images, voxels of each level.
        eta: pyramid downscaling factor per level (0 < η < 1).
        min_size: the coarsest level's smallest side, voxels.
        fixed_point_iterations, sor_iterations, omega: the solver.
        zeta, epsilon: ``ζ`` of the data normalization and ``ε`` of Ψ.
    """

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 5.0
    delta: float = 0.5
    kappa: float = 5.0
    sigma: float = 0.6
    eta: float = 0.95
    min_size: int = 25
    fixed_point_iterations: int = 5
    sor_iterations: int = 25
    omega: float = 1.6
    zeta: float = 0.1
    epsilon: float = 0.001

    def validate(self) -> VariationalFlowConfig:
        for name in ("alpha", "beta", "gamma", "delta", "kappa", "sigma", "zeta"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise InputError(f"variational flow: {name} must be >= 0, got {v}")
        if not 0 < self.eta < 1:
            raise InputError(f"variational flow: eta must be in (0, 1), got {self.eta}")
        if not 0 < self.omega < 2:
            raise InputError(f"variational flow: omega must be in (0, 2), got {self.omega}")
        if self.epsilon <= 0 or self.min_size < 2:
            raise InputError(
                f"variational flow: need epsilon > 0 and min_size >= 2, got {self.epsilon} "
                f"and {self.min_size}"
            )
        for name in ("fixed_point_iterations", "sor_iterations"):
            if getattr(self, name) < 1:
                raise InputError(f"variational flow: {name} must be >= 1")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def match_field(
    points: Tensor, displacements: Tensor, scores: Tensor, shape: tuple[int, ...], radius: float
) -> tuple[Tensor, Tensor]:
    """The matches as dense fields on a grid of ``shape``: the weight ``c·φ`` ``(1, 1, *S)``
    and the matched flow ``w'`` ``(1, D, *S)``.

    Every match (a point ``(K, D)`` in voxels, its displacement ``(K, D)`` and score ``(K,)``)
    covers the voxels within ``radius`` (its patch) with its score; overlapping matches
    average, weighted by score. Both fields are then spread by a Gaussian of σ = ``radius``
    (``φ``), ``w'`` as the score-weighted mean, so a match also guides its neighbourhood.
    """
    d = len(shape)
    weight = torch.zeros(1, 1, *shape, dtype=displacements.dtype)
    flow = torch.zeros(1, d, *shape, dtype=displacements.dtype)
    if len(scores):
        r = max(0, int(math.floor(radius)))
        steps = torch.arange(-r, r + 1)
        offsets = torch.stack(
            [g.reshape(-1) for g in torch.meshgrid(*[steps] * d, indexing="ij")], 1
        )
        voxels = (points.round().long()[:, None, :] + offsets[None]).reshape(-1, d)
        inside = ((voxels >= 0) & (voxels < torch.tensor(shape))).all(1)
        s = scores[:, None].expand(-1, len(offsets)).reshape(-1)[inside]
        disp = displacements[:, None, :].expand(-1, len(offsets), -1).reshape(-1, d)[inside]
        flat = torch.zeros((), dtype=torch.long)
        for axis in range(d):
            flat = flat * shape[axis] + voxels[inside, axis]
        weight.view(-1).index_add_(0, flat, s.to(weight.dtype))
        for axis in range(d):
            flow[0, axis].view(-1).index_add_(0, flat, (s * disp[:, axis]).to(flow.dtype))
        count = torch.zeros(1, 1, *shape, dtype=weight.dtype)
        count.view(-1).index_add_(0, flat, torch.ones_like(s, dtype=weight.dtype))
        weight = weight / count.clamp_min(1)  # mean score of the covering matches
        flow = flow / count.clamp_min(1)
    if radius > 0:
        weight, flow = gaussian_blur(weight, radius), gaussian_blur(flow, radius)
    return weight, flow / weight.clamp_min(1e-8)


def _levels(shape: tuple[int, ...], eta: float, min_size: int) -> list[tuple[int, ...]]:
    """Pyramid shapes, finest first: ``round(S · η^l)`` while the smallest side ≥ min_size."""
    out = [tuple(shape)]
    k = 1
    while True:
        nxt = tuple(max(1, round(s * eta**k)) for s in shape)
        if min(nxt) < min_size or nxt == out[-1]:
            return out
        out.append(nxt)
        k += 1


def _psi_prime(s2: Tensor, eps: float) -> Tensor:
    """``Ψ'(s²) = 1 / (2 √(s² + ε²))``."""
    return 0.5 / torch.sqrt(s2 + eps * eps)


def _neighbour_sum(x: Tensor, weights: list[Tensor]) -> Tensor:
    """``Σ_n g_{x,n} x_n`` over the 2·D axis neighbours, ``weights[a]`` the edge weights between
    ``x`` and ``x + e_a`` (zero past the border)."""
    out = torch.zeros_like(x)
    for a, g in enumerate(weights):
        dim = x.dim() - len(weights) + a
        n = x.shape[dim]
        fwd = g.narrow(dim, 0, n - 1)
        out.narrow(dim, 0, n - 1).add_(fwd * x.narrow(dim, 1, n - 1))
        out.narrow(dim, 1, n - 1).add_(fwd * x.narrow(dim, 0, n - 1))
    return out


def _edge_weights(g: Tensor, d: int) -> list[Tensor]:
    """Edge weights ``(g(x) + g(x + e_a)) / 2`` per axis (the last slice zero)."""
    out = []
    for a in range(d):
        dim = g.dim() - d + a
        n = g.shape[dim]
        e = torch.zeros_like(g)
        e.narrow(dim, 0, n - 1).copy_(0.5 * (g.narrow(dim, 0, n - 1) + g.narrow(dim, 1, n - 1)))
        out.append(e)
    return out


def _level(
    f: Tensor,
    m: Tensor,
    w: Tensor,
    local_alpha: Tensor,
    match_weight: Tensor,
    match_flow: Tensor,
    cfg: VariationalFlowConfig,
) -> Tensor:
    """One pyramid level: warp, then fixed-point iterations of SOR; returns the new flow."""
    d = w.shape[1]
    # the moving image's derivatives, warped: derivatives *of the warped image* carry ∇w
    # terms, with which the fixed-point iterations diverged at the borders (measured)
    grad_f, grad_m = spatial_gradient(f)[:, 0], spatial_gradient(m)[:, 0]  # (1, D, *S)
    hess_f, hess_m = spatial_gradient(grad_f), spatial_gradient(grad_m)  # [a, b]: ∂_b ∂_a
    size = f.shape[2:]
    mw, grad_m, hess_m = (
        warp(t.reshape(1, -1, *size), w).reshape(t.shape) for t in (m, grad_m, hess_m)
    )
    inside = warp(torch.ones_like(m), w, padding="zeros") > 0.999
    grad = 0.5 * (grad_f + grad_m)
    it = (mw - f)[:, 0]  # temporal derivative (1, *S)
    hess = 0.5 * (hess_f + hess_m)
    it_d = grad_m - grad_f  # (1, D, *S)
    zeta2 = cfg.zeta**2
    theta0 = 1.0 / ((grad**2).sum(1) + zeta2)
    theta = 1.0 / ((hess**2).sum(2) + zeta2)  # (1, D, *S), per gradient component
    mask = inside[:, 0].to(f.dtype)
    parity = sum(
        torch.arange(s, device=f.device).view(*([1] * i), s, *([1] * (d - 1 - i)))
        for i, s in enumerate(f.shape[2:])
    )
    colours = [(parity % 2 == c)[None] for c in (0, 1)]
    dw = torch.zeros_like(w)
    eps = cfg.epsilon
    for _ in range(cfg.fixed_point_iterations):
        # robust weights at w + dw (lagged nonlinearity)
        r0 = it + (grad * dw).sum(1)
        r1 = it_d + (hess * dw[:, None]).sum(2)  # (1, D, *S)
        psi0 = cfg.delta * DATA_SCALE * _psi_prime(theta0 * r0**2, eps) * theta0 * mask
        psi1 = cfg.gamma * DATA_SCALE * _psi_prime((theta * r1**2).sum(1), eps) * mask
        wt = w + dw
        smooth = (spatial_gradient(wt, mode="forward") ** 2).sum((1, 2))
        g = _edge_weights(local_alpha * _psi_prime(smooth, eps), d)
        gsum = _neighbour_sum(torch.ones_like(smooth), g)
        psim = cfg.beta * match_weight[:, 0] * _psi_prime(((wt - match_flow) ** 2).sum(1), eps)
        # linear system per voxel: Σ_b A_ab dw_b + B_a − div(g ∇(w_a + dw_a)) + M (w_a + dw_a − w'_a) = 0
        a_mat = psi0[:, None, None] * grad[:, :, None] * grad[:, None, :] + (
            psi1[:, None, None] * (theta[:, :, None, None] * hess[:, :, :, None] * hess[:, :, None])
        ).sum(1)
        b_vec = psi0[:, None] * grad * it[:, None] + psi1[:, None] * (
            theta[:, :, None] * hess * it_d[:, :, None]
        ).sum(1)
        div_w = torch.stack([_neighbour_sum(w[:, a], g) - gsum * w[:, a] for a in range(d)], 1)
        rhs = -b_vec + div_w + psim[:, None] * (match_flow - w)
        for _ in range(cfg.sor_iterations):
            for colour in colours:
                for a in range(d):
                    coupled = sum(a_mat[:, a, b] * dw[:, b] for b in range(d) if b != a)
                    num = rhs[:, a] - coupled + _neighbour_sum(dw[:, a], g)
                    den = a_mat[:, a, a] + gsum + psim
                    new = (1 - cfg.omega) * dw[:, a] + cfg.omega * num / den.clamp_min(1e-12)
                    dw[:, a] = torch.where(colour, new, dw[:, a])
    return w + dw


def variational_flow(
    fixed: Tensor,
    moving: Tensor,
    config: VariationalFlowConfig | None = None,
    matches: tuple[Tensor, Tensor] | None = None,
    initial: Tensor | None = None,
) -> Tensor:
    """DeepFlow's flow ``(1, D, *S)`` (voxels) from ``fixed`` to ``moving`` ``(1, 1, *S)``:
    ``fixed(x) ≈ moving(x + w(x))`` (module doc).

    ``matches``: ``(weight (1, 1, *S), flow (1, D, *S))`` of :func:`match_field` on the
    images' grid (none: no matching term). ``initial``: a starting flow (voxels)."""
    cfg = (config or VariationalFlowConfig()).validate()
    d = fixed.dim() - 2
    if d not in (2, 3) or fixed.shape[:2] != (1, 1) or moving.shape != fixed.shape:
        raise InputError(
            "variational flow: needs fixed and moving (1, 1, *S) of one shape, 2D or 3D; got "
            f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
        )
    shape = tuple(fixed.shape[2:])
    if min(shape) < 2:
        raise InputError(f"variational flow: images of {shape} voxels are too small")
    f0, m0 = fixed.double() * 255.0, moving.double() * 255.0
    if matches is None:
        weight0, mflow0 = torch.zeros_like(f0), torch.zeros(1, d, *shape, dtype=f0.dtype)
    else:
        weight0, mflow0 = (t.to(f0.dtype) for t in matches)
    w = torch.zeros(1, d, *shape, dtype=f0.dtype) if initial is None else initial.to(f0.dtype)
    levels = _levels(shape, cfg.eta, cfg.min_size)
    w = resize_displacement(w, levels[-1])
    for k, size in reversed(list(enumerate(levels))):
        scale = min(n / s for n, s in zip(size, shape, strict=True))
        antialias = 0.5 * math.sqrt(max(0.0, 1 / scale**2 - 1))  # original voxels
        f, m = (
            gaussian_blur(resize_linear(gaussian_blur(t, antialias), size), cfg.sigma)
            for t in (f0, m0)
        )
        if k < len(levels) - 1:
            w = resize_displacement(w, size)
        g1 = spatial_gradient(f / 255.0)[:, 0].norm(dim=1)
        local_alpha = cfg.alpha * torch.exp(-cfg.kappa * g1)
        mw = resize_linear(weight0, size)
        mf = resize_displacement(mflow0, size)
        w = _level(f, m, w, local_alpha, mw, mf, cfg)
    return w.to(fixed.dtype)
