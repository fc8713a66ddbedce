"""Affine transforms fitted to point correspondences: least squares, and RANSAC for matches
that contain outliers (Fischler and Bolles 1981; MSAC scoring, Torr and Zisserman 2000).

Points are ``(P, D)`` (D = 2 or 3) in any one coordinate frame per side, e.g. world mm; the
fitted homogeneous ``(D+1, D+1)`` matrix maps ``fixed`` points onto ``moving`` points
(``moving ≈ A fixed + t``), the convention of :class:`~learnreg.spatial.affine.AffineTransform`
(fixed world → moving world).
"""

from __future__ import annotations

import torch

__all__ = ["fit_affine", "ransac_affine"]


def _check(fixed: torch.Tensor, moving: torch.Tensor, what: str) -> int:
    if fixed.dim() != 2 or fixed.shape != moving.shape or fixed.shape[-1] not in (2, 3):
        raise ValueError(
            f"{what}: point sets must both be (P, D) with D in 2, 3; got {tuple(fixed.shape)} "
            f"and {tuple(moving.shape)}"
        )
    d = fixed.shape[-1]
    if fixed.shape[0] < d + 1:
        raise ValueError(
            f"{what}: a {d}D affine needs at least {d + 1} points, got {fixed.shape[0]}"
        )
    if not (torch.isfinite(fixed).all() and torch.isfinite(moving).all()):
        raise ValueError(f"{what}: points must be finite")
    return d


def _homogeneous(points: torch.Tensor) -> torch.Tensor:
    return torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)


def _solve(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Least-squares ``(…, D+1, D+1)`` matrices of batched ``(…, P, D)`` correspondences
    (rank-deficient sets give a minimum-norm solution, not an error)."""
    d = fixed.shape[-1]
    sol = torch.linalg.lstsq(_homogeneous(fixed), moving, driver="gelsd").solution  # (…, D+1, D)
    m = torch.zeros(*sol.shape[:-2], d + 1, d + 1, dtype=sol.dtype, device=sol.device)
    m[..., :d, :] = sol.transpose(-1, -2)
    m[..., d, d] = 1
    return m


def _residuals(matrix: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    d = fixed.shape[-1]
    mapped = _homogeneous(fixed) @ matrix[..., :d, :].transpose(-1, -2)
    r = torch.linalg.norm(mapped - moving, dim=-1)
    return torch.nan_to_num(r, nan=float("inf"), posinf=float("inf"))


def fit_affine(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """The least-squares affine ``(D+1, D+1)`` (float64) mapping ``fixed`` onto ``moving``
    points ``(P, D)``, P ≥ D + 1."""
    _check(fixed, moving, "fit_affine")
    return _solve(fixed.double(), moving.double())


def ransac_affine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    threshold: float,
    iterations: int = 500,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust affine from correspondences with outliers.

    ``iterations`` random minimal sets (D + 1 distinct correspondences) each give an exact
    affine; the one with the lowest MSAC cost ``Σ min(r², threshold²)`` wins, and is refitted
    by least squares to its inliers (residual ``r < threshold``, in the points' units) until
    the inlier set stops changing (at most 5 times).

    Returns the ``(D+1, D+1)`` float64 matrix (fixed → moving) and the ``(P,)`` bool inlier
    mask of the final fit. Fewer than D + 1 inliers fall back to the least-squares fit of all
    points.
    """
    d = _check(fixed, moving, "ransac_affine")
    if not threshold > 0:
        raise ValueError(f"ransac_affine: threshold must be > 0, got {threshold}")
    if iterations < 1:
        raise ValueError(f"ransac_affine: iterations must be >= 1, got {iterations}")
    f, m = fixed.double(), moving.double()
    p = f.shape[0]
    keys = torch.rand(int(iterations), p, generator=generator, dtype=torch.float64)
    sets = keys.argsort(dim=1)[:, : d + 1]  # distinct indices per hypothesis
    hypotheses = _solve(f[sets], m[sets])  # (I, D+1, D+1)
    r = _residuals(hypotheses, f.expand(len(sets), p, d), m.expand(len(sets), p, d))
    cost = r.square().clamp(max=threshold**2).sum(dim=1)
    best = hypotheses[int(cost.argmin())]
    inliers = _residuals(best, f, m) < threshold
    for _ in range(5):
        if int(inliers.sum()) < d + 1:
            return _solve(f, m), torch.ones(p, dtype=torch.bool)
        best = _solve(f[inliers], m[inliers])
        new = _residuals(best, f, m) < threshold
        if torch.equal(new, inliers):
            break
        inliers = new
    return best, _residuals(best, f, m) < threshold
