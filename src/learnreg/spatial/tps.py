"""Thin-plate splines through landmark pairs, in world coordinates (RAS mm)."""

from __future__ import annotations

import torch

from learnreg.spatial.base import SpatialTransform

__all__ = ["ThinPlateSpline", "tps_kernel"]


def tps_kernel(r2: torch.Tensor, ndim: int) -> torch.Tensor:
    """Polyharmonic kernel of squared distances: ``r² log r²`` in 2D, ``r`` in 3D.

    These are the fundamental solutions of the biharmonic operator (up to constant
    factors, absorbed by the weights); ``U(0) = 0`` with a finite gradient.
    """
    tiny = torch.finfo(r2.dtype).tiny
    if ndim == 2:
        return r2 * torch.log(r2.clamp_min(tiny))
    return r2.clamp_min(tiny).sqrt()


class ThinPlateSpline(SpatialTransform):
    """``f(x) = a₀ + A x + Σ_k w_k U(|x - p_k|)`` with ``f(p_k) = q_k``.

    Args:
        source_points: control points ``p`` in fixed space, ``(N, K, D)`` or ``(K, D)``.
        target_points: their images ``q`` in moving space, same shape.
        regularization: ``λ ≥ 0`` added to the kernel diagonal; ``0`` interpolates exactly,
            larger values approximate (smoother; in squared-mm-like units of the kernel).
        learnable: make the target points an ``nn.Parameter``.

    The ``(K + D + 1)`` linear system is solved in float64 with ``torch.linalg.solve``
    (differentiable in both point sets). Needs ``K ≥ D + 1`` points not all on a hyperplane.
    """

    def __init__(
        self,
        source_points: torch.Tensor,
        target_points: torch.Tensor,
        regularization: float = 0.0,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        src = source_points if source_points.dim() == 3 else source_points.unsqueeze(0)
        dst = target_points if target_points.dim() == 3 else target_points.unsqueeze(0)
        d = src.shape[-1]
        if d not in (2, 3) or dst.shape[-1] != d or src.shape[1] != dst.shape[1]:
            raise ValueError(
                "ThinPlateSpline: source and target points must be (N, K, D) with D = 2 or 3 "
                f"and equal K; got {tuple(source_points.shape)}, {tuple(target_points.shape)}"
            )
        if src.shape[1] < d + 1:
            raise ValueError(f"ThinPlateSpline needs at least {d + 1} points, got {src.shape[1]}")
        if regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        self.ndim = d
        self.regularization = float(regularization)
        self.register_buffer("source_points", src)
        self._register_tensor("target_points", dst, learnable)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel weights ``(N, K, D)`` and affine part ``(N, D+1, D)`` (float64)."""
        p = self.source_points.double()
        q = self.target_points.double()
        n = max(p.shape[0], q.shape[0])
        p, q = p.expand(n, -1, -1), q.expand(n, -1, -1)
        k, d = p.shape[1], self.ndim
        kern = tps_kernel(_squared_distances(p, p), d)
        kern = kern + self.regularization * torch.eye(k, dtype=p.dtype, device=p.device)
        poly = torch.cat([torch.ones_like(p[..., :1]), p], dim=-1)  # (N, K, D+1)
        zeros = torch.zeros(n, d + 1, d + 1, dtype=p.dtype, device=p.device)
        system = torch.cat(
            [torch.cat([kern, poly], -1), torch.cat([poly.transpose(1, 2), zeros], -1)], 1
        )
        rhs = torch.cat([q, torch.zeros(n, d + 1, d, dtype=p.dtype, device=p.device)], 1)
        sol = torch.linalg.solve(system, rhs)
        return sol[:, :k], sol[:, k:]

    def forward(self, points: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        w, a = self.coefficients()
        p = self.source_points.double().expand(w.shape[0], -1, -1)
        n = max(w.shape[0], points.shape[0])
        flat = points.reshape(points.shape[0], -1, self.ndim).double().expand(n, -1, -1)
        out = []
        for x in flat.split(chunk, dim=1):
            r2 = _squared_distances(x, p.expand(n, -1, -1))
            u = tps_kernel(r2, self.ndim) @ w.expand(n, -1, -1)
            out.append(u + x @ a[:, 1:].expand(n, -1, -1) + a[:, :1].expand(n, -1, -1))
        return torch.cat(out, dim=1).to(points.dtype).reshape(n, *points.shape[1:])


def _squared_distances(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``|x_i - p_k|²`` for ``x (N, M, D)``, ``p (N, K, D)`` (exact, differentiable at 0)."""
    return (x[:, :, None] - p[:, None]).square().sum(-1)
