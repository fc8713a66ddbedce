"""2D projective transforms (homographies) of world points."""

from __future__ import annotations

import torch

from learnreg.spatial.base import SpatialTransform

__all__ = ["Homography"]


class Homography(SpatialTransform):
    """``x ↦ (H [x; 1])[:2] / (H [x; 1])[2]`` with ``H (N, 3, 3)`` normalized so ``H[2, 2] = 1``.

    Parameters ``(N, 8)`` are the first eight entries of ``H - I`` (row-major), so zero is the
    identity. 2D only.
    """

    ndim = 2

    def __init__(
        self, batch: int = 1, *, params: torch.Tensor | None = None, learnable: bool = False
    ) -> None:
        super().__init__()
        if params is None:
            params = torch.zeros(batch, 8)
        if params.dim() == 1:
            params = params.unsqueeze(0)
        if params.dim() != 2 or params.shape[1] != 8:
            raise ValueError(f"Homography: params must be (N, 8); got {tuple(params.shape)}")
        self._register_tensor(
            "params", params if params.is_floating_point() else params.float(), learnable
        )

    @classmethod
    def from_params(cls, params: torch.Tensor, learnable: bool = False) -> Homography:
        """From parameters ``(N, 8)``, e.g. a network's regression head output."""
        return cls(params=params, learnable=learnable)

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, learnable: bool = False) -> Homography:
        """From ``(3, 3)`` or ``(N, 3, 3)`` matrices (any scale; divided by ``H[2, 2]``)."""
        h = matrix if matrix.dim() == 3 else matrix.unsqueeze(0)
        if h.shape[1:] != (3, 3):
            raise ValueError(f"Homography: matrix must be (N, 3, 3); got {tuple(matrix.shape)}")
        h = h / h[:, 2:, 2:]
        eye = torch.eye(3, dtype=h.dtype, device=h.device)
        return cls(params=(h - eye).flatten(1)[:, :8], learnable=learnable)

    @classmethod
    def from_corners(cls, src: torch.Tensor, dst: torch.Tensor) -> Homography:
        """The homography mapping four points ``src (N, 4, 2)`` onto ``dst (N, 4, 2)``.

        Direct linear transform on Hartley-normalized points, solving the 8x8 system with
        ``torch.linalg.solve`` (differentiable in both point sets).
        """
        if src.dim() == 2:
            src, dst = src.unsqueeze(0), dst.unsqueeze(0)
        if src.shape[1:] != (4, 2) or dst.shape != src.shape:
            raise ValueError(
                f"from_corners: src and dst must both be (N, 4, 2); got {tuple(src.shape)}, "
                f"{tuple(dst.shape)}"
            )
        ts, td = _normalizer(src), _normalizer(dst)
        s, d = _apply(ts, src), _apply(td, dst)
        x, y, u, v = s[..., 0], s[..., 1], d[..., 0], d[..., 1]
        one, zero = torch.ones_like(x), torch.zeros_like(x)
        # u (h6 x + h7 y + 1) = h0 x + h1 y + h2 and likewise for v with h3..h5
        ru = torch.stack([x, y, one, zero, zero, zero, -x * u, -y * u], -1)
        rv = torch.stack([zero, zero, zero, x, y, one, -x * v, -y * v], -1)
        a = torch.cat([ru, rv], dim=1)  # (N, 8, 8)
        h = torch.linalg.solve(a, torch.cat([u, v], dim=1))
        hn = torch.cat([h, one[:, :1]], dim=1).view(-1, 3, 3)
        return cls.from_matrix(torch.linalg.inv(td) @ hn @ ts)

    def homogeneous(self) -> torch.Tensor:
        """The matrices ``(N, 3, 3)`` with ``H[2, 2] = 1``."""
        p = self.params
        h = torch.cat([p, torch.zeros_like(p[:, :1])], dim=1).view(-1, 3, 3)
        return h + torch.eye(3, dtype=p.dtype, device=p.device)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if points.shape[-1] != 2:
            raise ValueError(f"Homography maps 2D points (N, ..., 2); got {tuple(points.shape)}")
        h = self.homogeneous().to(points.dtype)
        n = max(h.shape[0], points.shape[0])
        flat = points.reshape(points.shape[0], -1, 2).expand(n, -1, -1)
        return _apply(h.expand(n, 3, 3), flat).reshape(n, *points.shape[1:])

    def inverse(self) -> Homography:
        """The exact inverse, ``H⁻¹`` renormalized (differentiable)."""
        return Homography.from_matrix(torch.linalg.inv(self.homogeneous()))


def _apply(h: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Projective map of ``pts (N, M, 2)`` by ``h (N, 3, 3)`` with the perspective divide."""
    q = pts @ h[:, :2, :2].transpose(1, 2) + h[:, None, :2, 2]
    w = pts @ h[:, 2:, :2].transpose(1, 2) + h[:, None, 2:, 2]
    return q / w


def _normalizer(pts: torch.Tensor) -> torch.Tensor:
    """Similarity ``(N, 3, 3)`` moving ``pts (N, M, 2)`` to zero mean, mean distance √2."""
    c = pts.mean(dim=1)
    s = 2**0.5 / (pts - c[:, None]).norm(dim=-1).mean(dim=1)
    t = torch.zeros(pts.shape[0], 3, 3, dtype=pts.dtype, device=pts.device)
    t[:, 0, 0] = t[:, 1, 1] = s
    t[:, :2, 2] = -s[:, None] * c
    t[:, 2, 2] = 1
    return t
