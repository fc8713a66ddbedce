"""CPAB: continuous piecewise-affine velocity fields and their integration.

Freifeld, Hauberg, Batmanghelich and Fisher, "Transformations based on continuous
piecewise-affine velocity fields", IEEE TPAMI 2017; used as a spatial transformer layer by
Detlefsen, Freifeld and Hauberg, "Deep diffeomorphic transformer networks", CVPR 2018 (the
review's DTN).

The domain ``[0, 1]^D`` is cut into cells (:class:`Tessellation`): intervals in 1D; in 2D a
grid of rectangles, each split into four triangles by its diagonals (Freifeld's "type I").
In cell ``c`` the velocity is affine, ``v(u) = A_c [u; 1]``. Continuity across the faces that
cells share is linear in the ``A_c`` (the two affine maps agree at the face's vertices,
:meth:`Tessellation.constraints`), and ``zero_boundary`` adds ``v = 0`` on the domain's
boundary; the admissible fields are the null space of those constraints, ``vec(A) = B θ``
with ``B`` an orthonormal basis of it and ``θ ∈ R^d`` the parameters a network regresses
(Freifeld take ``B`` from an SVD; here it is the canonical one of :meth:`Tessellation._basis`,
the same on every machine and thread count, which an SVD's null-space basis is not). The transform is the flow for unit time,
``T^θ(u) = φ^θ(u, 1)``: an orientation-preserving homeomorphism, piecewise smooth, whose
inverse is ``T^{−θ}``. Outside the domain the velocity is zero with ``zero_boundary``
(points there stay put) and otherwise that of the nearest point of the domain (continuous, so
the flow stays a homeomorphism of the whole space).

Integration (:func:`integrate`):

- 1D, closed form: inside a cell the flow of ``v = a u + b`` is ``u(t) = u + v(u) t φ₁(a t)``
  with ``φ₁(z) = (e^z − 1)/z``, and the time to reach the cell's end is
  ``(u_b − u)/v · log1p(z)/z``, ``z = a (u_b − u)/v``; a point that reaches it continues in the
  next cell with the time left (at most one crossing per cell; outside the domain the velocity
  is constant, a zone of its own).
- 2D, numerically (no closed form for the exit times of triangles): the flow inside a cell is
  closed form, ``exp(h Ã_c) [u; 1]``, and is applied in ``steps`` steps ``h = 1/steps``; a
  point whose step would end in another cell (or starts or ends outside the domain) takes
  that step in ``substeps`` midpoint steps of the velocity instead (Freifeld's scheme, also
  libcpab's).

Coordinates: :class:`CPABTransform` maps index points of a grid of ``shape``, normalized per
axis by ``S − 1`` (index axis ``i`` ↔ tessellation axis ``i``); wrap it in
:class:`~learnreg.spatial.frame.GridFrame` for world points. 3D (tetrahedral cells) is not
implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from learnreg.spatial.base import SpatialTransform

__all__ = ["Tessellation", "integrate", "CPABTransform"]


class Tessellation:
    """The cells of ``[0, 1]^D`` and the basis of continuous piecewise-affine velocities.

    Args:
        cells: cells per axis: ``(n,)`` intervals (1D) or ``(n0, n1)`` rectangles of four
            triangles each (2D).
        zero_boundary: velocity zero on the domain's boundary (and outside it).

    Attributes: :attr:`num_cells`, :attr:`dim` (``d``, the number of parameters),
    :attr:`basis` ``(num_cells · D · (D+1), d)`` float64 (orthonormal columns),
    :attr:`vertices` ``(num_cells, D+1, D)`` float64.
    """

    def __init__(self, cells: Sequence[int], zero_boundary: bool = True) -> None:
        self.cells = tuple(int(n) for n in cells)
        if len(self.cells) not in (1, 2) or any(n < 1 for n in self.cells):
            raise ValueError(f"Tessellation: cells must be 1 or 2 sizes >= 1, got {cells}")
        self.ndim = len(self.cells)
        self.zero_boundary = bool(zero_boundary)
        self.vertices = self._vertices()
        self.num_cells = self.vertices.shape[0]
        self.basis = self._basis()
        self.dim = self.basis.shape[1]
        if self.dim == 0:
            raise ValueError(f"Tessellation {self.cells}: no admissible velocity field")

    def _vertices(self) -> torch.Tensor:
        if self.ndim == 1:
            n = self.cells[0]
            k = torch.arange(n, dtype=torch.float64)
            return torch.stack([k / n, (k + 1) / n], 1)[..., None]
        n0, n1 = self.cells
        tris = []
        for i in range(n0):
            for j in range(n1):
                c00, c01 = (i / n0, j / n1), (i / n0, (j + 1) / n1)
                c10, c11 = ((i + 1) / n0, j / n1), ((i + 1) / n0, (j + 1) / n1)
                mid = ((i + 0.5) / n0, (j + 0.5) / n1)
                # 0: the face u0 = i/n0, 1: u0 = (i+1)/n0, 2: u1 = j/n1, 3: u1 = (j+1)/n1
                tris += [(mid, c00, c01), (mid, c10, c11), (mid, c00, c10), (mid, c01, c11)]
        return torch.tensor(tris, dtype=torch.float64)

    @staticmethod
    def _key(vertex: torch.Tensor) -> tuple[float, ...]:
        return tuple(round(float(x), 9) for x in vertex)

    def _basis(self) -> torch.Tensor:
        """An orthonormal basis of the continuous fields: the "hat" fields (velocity ``e_r``
        at one free vertex, zero at all others, affine in every cell) orthonormalized
        symmetrically, ``B₀ (B₀ᵀB₀)^{-1/2}`` — unique, unlike an SVD null-space basis, so a
        ``θ`` means the same field on every machine."""
        d = self.ndim
        keys = sorted({self._key(v) for cell in self.vertices for v in cell})
        free = [k for k in keys if not (self.zero_boundary and any(x in (0.0, 1.0) for x in k))]
        index = {k: i for i, k in enumerate(free)}
        hats = torch.zeros(self.num_cells, d, d + 1, len(free), d, dtype=torch.float64)
        for c, verts in enumerate(self.vertices):
            corners = torch.cat([verts.T, verts.new_ones(1, d + 1)])  # (D+1, D+1)
            inv = torch.linalg.inv(corners)
            for j, v in enumerate(verts):
                k = index.get(self._key(v))
                if k is None:
                    continue
                for r in range(d):  # A_c [v_j; 1] = e_r, zero at the cell's other vertices
                    hats[c, r, :, k, r] = inv[j]
        b0 = hats.reshape(self.num_cells * d * (d + 1), len(free) * d)
        w, v = torch.linalg.eigh(b0.T @ b0)
        return (b0 @ (v * w.rsqrt()) @ v.T).contiguous()

    def constraints(self) -> torch.Tensor:
        """Rows ``L`` with ``L vec(A) = 0`` exactly for continuous (and, with
        ``zero_boundary``, boundary-zero) fields: the affine maps of two cells agree at the
        vertices of the face they share."""
        d = self.ndim
        width = d * (d + 1)
        faces: dict[tuple, list[tuple[int, list[torch.Tensor]]]] = {}
        for c, verts in enumerate(self.vertices):
            for drop in range(d + 1):  # a face: all vertices but one
                face = [verts[k] for k in range(d + 1) if k != drop]
                key = tuple(sorted(self._key(v) for v in face))
                faces.setdefault(key, []).append((c, face))

        def row(cell: int, vertex: torch.Tensor, comp: int) -> torch.Tensor:
            r = torch.zeros(self.num_cells * width, dtype=torch.float64)
            start = cell * width + comp * (d + 1)
            r[start : start + d + 1] = torch.cat([vertex, vertex.new_ones(1)])
            return r

        rows = []
        for shared in faces.values():
            if len(shared) == 2:
                (a, face), (b, _) = shared
                rows += [row(a, v, r) - row(b, v, r) for v in face for r in range(d)]
            elif self.zero_boundary:
                (a, face) = shared[0]
                rows += [row(a, v, r) for v in face for r in range(d)]
        if not rows:
            return torch.zeros(0, self.num_cells * width, dtype=torch.float64)
        return torch.stack(rows)

    def affine(self, theta: torch.Tensor) -> torch.Tensor:
        """Per-cell matrices ``(N, num_cells, D, D+1)`` of parameters ``θ`` ``(N, d)``."""
        if theta.dim() != 2 or theta.shape[1] != self.dim:
            raise ValueError(
                f"CPAB parameters must be (N, {self.dim}) for a {self.cells} tessellation; got "
                f"{tuple(theta.shape)}"
            )
        a = theta @ self.basis.to(theta).T
        return a.reshape(theta.shape[0], self.num_cells, self.ndim, self.ndim + 1)

    def cell_of(self, u: torch.Tensor) -> torch.Tensor:
        """Index of the cell of points ``(..., D)`` (outside the domain: the nearest one)."""
        if self.ndim == 1:
            n = self.cells[0]
            return (u[..., 0] * n).floor().clamp(0, n - 1).long()
        n0, n1 = self.cells
        i = (u[..., 0] * n0).floor().clamp(0, n0 - 1)
        j = (u[..., 1] * n1).floor().clamp(0, n1 - 1)
        s, t = u[..., 0] * n0 - i, u[..., 1] * n1 - j
        k = torch.where(
            (s <= t) & (s <= 1 - t),
            0,
            torch.where((s >= t) & (s >= 1 - t), 1, torch.where(t <= s, 2, 3)),
        )
        return (4 * (i * n1 + j)).long() + k

    def inside(self, u: torch.Tensor) -> torch.Tensor:
        """Whether points ``(..., D)`` lie in the closed domain ``[0, 1]^D``."""
        return ((u >= 0) & (u <= 1)).all(-1)

    def velocity(self, theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """``v^θ`` at points ``(N, ..., D)`` of the unit domain."""
        a = self.affine(theta)
        flat = points.reshape(points.shape[0], -1, self.ndim)
        batch = torch.arange(flat.shape[0], device=flat.device)[:, None].expand(flat.shape[:2])
        v = self._velocity(a, flat.reshape(-1, self.ndim), batch.reshape(-1))
        return v.reshape(points.shape)

    def _velocity(self, a: torch.Tensor, u: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Velocity at flat points ``(M, D)`` of transforms ``batch`` ``(M,)``; outside the
        domain, that of the nearest point of it (continuous; zero with ``zero_boundary``)."""
        u = u.clamp(0, 1)
        m = a[batch, self.cell_of(u)]  # (M, D, D+1)
        return (m[..., :-1] @ u[..., None])[..., 0] + m[..., -1]


def _phi1(z: torch.Tensor) -> torch.Tensor:
    """``(e^z − 1)/z``, 1 at 0."""
    small = z.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(z), z)
    return torch.where(small, 1 + z / 2, torch.expm1(safe) / safe)


def _log1p_ratio(z: torch.Tensor) -> torch.Tensor:
    """``log1p(z)/z``, 1 at 0 (for ``z > −1``)."""
    small = z.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(z), z)
    return torch.where(small, 1 - z / 2, torch.log1p(safe) / safe)


def _integrate_1d(
    tess: Tessellation, a: torch.Tensor, u: torch.Tensor, batch: torch.Tensor
) -> torch.Tensor:
    n = tess.cells[0]
    x = u[:, 0]
    # zones 0 (left of the domain, the velocity at 0), 1..n (the cells), n+1 (right of it)
    zero = a.new_zeros(a.shape[0], 1)
    ends = [a[:, :1, 0, 1:2].squeeze(-1), (a[:, -1:, 0, 0] + a[:, -1:, 0, 1])]
    slope = torch.cat([zero, a[..., 0, 0], zero], 1)
    offset = torch.cat([ends[0], a[..., 0, 1], ends[1]], 1)
    c = torch.where(x < 0, 0, torch.where(x > 1, n + 1, tess.cell_of(u) + 1))
    time = torch.ones_like(x)
    inf = torch.full_like(x, float("inf"))
    moving = torch.ones_like(x, dtype=torch.bool)
    for _ in range(n + 3):  # a point crosses each zone boundary at most once
        s, b = slope[batch, c], offset[batch, c]
        v = s * x + b
        left = torch.where(c == 0, -inf, (c - 1).clamp_min(0).to(x.dtype) / n)
        right = torch.where(c == n + 1, inf, c.clamp_max(n).to(x.dtype) / n)
        end = x + v * time * _phi1(s * time)
        stays = (end >= left) & (end <= right)
        bound = torch.where(v > 0, right, left)
        gap = torch.where(stays, torch.zeros_like(x), bound - x)
        safe_v = torch.where(v == 0, torch.ones_like(v), v)
        z = s * gap / safe_v
        reaches = ~stays & (v != 0) & (z > -1)
        z = torch.where(reaches, z, torch.zeros_like(z))
        hit = gap / safe_v * _log1p_ratio(z)
        final = torch.where(stays, end, torch.minimum(torch.maximum(end, left), right))
        x = torch.where(moving & reaches, bound, torch.where(moving, final, x))
        time = torch.where(moving & reaches, (time - hit).clamp_min(0), torch.zeros_like(time))
        c = torch.where(moving & reaches, (c + torch.where(v > 0, 1, -1)).clamp(0, n + 1), c)
        moving = moving & reaches
        if not bool(moving.any()):
            break
    return x[:, None]


def _integrate_2d(
    tess: Tessellation,
    a: torch.Tensor,
    u: torch.Tensor,
    batch: torch.Tensor,
    steps: int,
    substeps: int,
) -> torch.Tensor:
    h = 1.0 / steps
    n, cells = a.shape[:2]
    square = torch.cat([a, a.new_zeros(n, cells, 1, 3)], 2)  # Ã_c (N, C, 3, 3)
    step = torch.linalg.matrix_exp(h * square)[..., :2, :]  # (N, C, 2, 3)
    x = u
    c, inside = tess.cell_of(x), tess.inside(x)
    for _ in range(steps):
        e = step[batch, c]
        end = (e[..., :-1] @ x[..., None])[..., 0] + e[..., -1]
        c_end, inside_end = tess.cell_of(end), tess.inside(end)
        # the in-cell closed form holds while a point stays in its cell of the domain
        leaves = (c_end != c) | ~inside | ~inside_end
        if bool(leaves.any()):
            idx = leaves.nonzero()[:, 0]
            y, bi, k = x[idx], batch[idx], h / substeps
            for _ in range(substeps):  # midpoint steps across the cell boundary
                mid = y + 0.5 * k * tess._velocity(a, y, bi)
                y = y + k * tess._velocity(a, mid, bi)
            end = end.index_put((idx,), y)
            c_end = c_end.index_put((idx,), tess.cell_of(y))
            inside_end = inside_end.index_put((idx,), tess.inside(y))
        x, c, inside = end, c_end, inside_end
    return x


def integrate(
    tess: Tessellation,
    theta: torch.Tensor,
    points: torch.Tensor,
    steps: int = 50,
    substeps: int = 10,
) -> torch.Tensor:
    """``T^θ`` of points ``(N, ..., D)`` of the unit domain (module docstring: closed form in
    1D; in 2D ``steps`` closed-form in-cell steps, ``substeps`` midpoint steps where a step
    crosses cells). Differentiable in ``θ`` and the points."""
    if points.shape[-1] != tess.ndim or points.shape[0] != theta.shape[0]:
        raise ValueError(
            f"integrate: points (N, ..., {tess.ndim}) for θ of N = {theta.shape[0]}; got "
            f"{tuple(points.shape)}"
        )
    if steps < 1 or substeps < 1:
        raise ValueError(f"integrate: steps and substeps must be >= 1, got {steps}, {substeps}")
    a = tess.affine(theta)
    flat = points.reshape(points.shape[0], -1, tess.ndim)
    batch = torch.arange(flat.shape[0], device=flat.device)[:, None].expand(flat.shape[:2])
    u, batch = flat.reshape(-1, tess.ndim), batch.reshape(-1)
    if tess.ndim == 1:
        out = _integrate_1d(tess, a, u, batch)
    else:
        out = _integrate_2d(tess, a, u, batch, int(steps), int(substeps))
    return out.reshape(points.shape)


class CPABTransform(SpatialTransform):
    """``T^θ`` on index points of a grid of ``shape`` (normalized per axis by ``S − 1``).

    Args:
        tessellation: the cells and basis (its ``D`` = ``len(shape)``).
        theta: parameters ``(N, d)`` (a network's output, kept in the graph, or optimized:
            ``learnable=True`` makes them this module's parameter).
        shape: the grid size whose index box is the domain.
        steps, substeps: the 2D integration (:func:`integrate`).
    """

    def __init__(
        self,
        tessellation: Tessellation,
        theta: torch.Tensor,
        shape: Sequence[int],
        steps: int = 50,
        substeps: int = 10,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != tessellation.ndim or any(s < 2 for s in self.shape):
            raise ValueError(
                f"CPABTransform: a {tessellation.ndim}D tessellation needs {tessellation.ndim} "
                f"grid sizes >= 2, got {self.shape}"
            )
        tessellation.affine(theta)  # checks the shape
        self.tessellation, self.ndim = tessellation, tessellation.ndim
        self.steps, self.substeps = int(steps), int(substeps)
        self._register_tensor("theta", theta, learnable)

    def _scale(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor([s - 1 for s in self.shape], dtype=like.dtype, device=like.device)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        scale = self._scale(points)
        theta = self.theta
        if theta.shape[0] != points.shape[0]:
            theta = theta.expand(points.shape[0], -1)
        out = integrate(
            self.tessellation, theta.to(points.dtype), points / scale, self.steps, self.substeps
        )
        return out * scale

    def inverse(self) -> CPABTransform:
        """``T^{−θ}``: the flow of the negated velocity."""
        return CPABTransform(self.tessellation, -self.theta, self.shape, self.steps, self.substeps)
