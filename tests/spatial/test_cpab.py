"""CPAB transforms against independent facts: the dimension of continuous piecewise-affine
fields, continuity, a fine Runge–Kutta integration of the same velocity, invertibility,
orientation preservation and finite-difference gradients."""

from __future__ import annotations

import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.io.images import read_image
from learnreg.optimize.pyramid import downsample
from learnreg.spatial.cpab import CPABTransform, Tessellation, integrate
from learnreg.spatial.frame import GridFrame
from learnreg.spatial.sampling import warp


def _rk4(tess: Tessellation, theta: torch.Tensor, u: torch.Tensor, n: int) -> torch.Tensor:
    """Classical RK4 of ``du/dt = v(u)`` for unit time in ``n`` steps."""
    h = 1.0 / n
    for _ in range(n):
        k1 = tess.velocity(theta, u)
        k2 = tess.velocity(theta, u + 0.5 * h * k1)
        k3 = tess.velocity(theta, u + 0.5 * h * k2)
        k4 = tess.velocity(theta, u + h * k3)
        u = u + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return u


def _unit_grid(n: int) -> torch.Tensor:
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.stack(torch.meshgrid(t, t, indexing="ij"), -1)[None]


@pytest.mark.parametrize(
    ("cells", "zero_boundary", "dim"),
    [
        ((5,), True, 4),  # 2·5 − 4 continuity − 2 boundary
        ((5,), False, 6),
        # piecewise-linear on triangles: 2 × free vertices (corners + rectangle centres)
        ((3, 3), False, 2 * (16 + 9)),
        ((3, 3), True, 2 * (4 + 9)),
        ((2, 4), True, 2 * (3 + 8)),
    ],
)
def test_dimension_is_that_of_continuous_fields(cells, zero_boundary, dim):
    tess = Tessellation(cells, zero_boundary)
    assert tess.dim == dim
    b = tess.basis
    torch.testing.assert_close(b.T @ b, torch.eye(dim, dtype=torch.float64))
    # the basis spans exactly the null space of the continuity (and boundary) constraints
    constraints = tess.constraints()
    assert float((constraints @ b).abs().max()) < 1e-12
    assert int(torch.linalg.matrix_rank(constraints)) + dim == b.shape[0]


def test_fields_are_continuous_and_vanish_on_the_boundary():
    torch.manual_seed(0)
    tess = Tessellation((3, 3), zero_boundary=True)
    theta = torch.randn(2, tess.dim, dtype=torch.float64)
    u = torch.rand(2, 4000, 2, dtype=torch.float64)
    eps = torch.randn_like(u) * 1e-7
    # the field is Lipschitz: nearby points have nearby velocities, whatever cells they are in
    jump = (tess.velocity(theta, u + eps) - tess.velocity(theta, u)).norm(dim=-1)
    assert float(jump.max()) < 1e-4
    t = torch.rand(2, 100, dtype=torch.float64)
    edge = torch.stack([t, torch.zeros_like(t)], -1)
    for side in (edge, edge.flip(-1), 1 - edge, (1 - edge).flip(-1)):
        assert float(tess.velocity(theta, side).abs().max()) < 1e-12
    assert (
        Tessellation((3, 3), zero_boundary=False)
        .velocity(torch.randn(1, 50, dtype=torch.float64), edge[:1])
        .abs()
        .max()
        > 1e-3
    )


@pytest.mark.parametrize("zero_boundary", [True, False])
def test_1d_closed_form_agrees_with_fine_rk4(zero_boundary):
    torch.manual_seed(1)
    tess = Tessellation((6,), zero_boundary)
    theta = 2 * torch.randn(3, tess.dim, dtype=torch.float64)
    u = torch.linspace(-0.2, 1.2, 301, dtype=torch.float64)[None, :, None].expand(3, -1, -1)
    exact = integrate(tess, theta, u)
    fine = _rk4(tess, theta, u, 2000)
    assert float((exact - fine).abs().max()) < 1e-6  # measured 1.4e-8 (RK4 at the kinks)
    assert float((exact - u).abs().max()) > 0.05
    y = exact[..., 0]
    assert bool((y[:, 1:] > y[:, :-1]).all())  # strictly increasing: a homeomorphism of R
    torch.testing.assert_close(integrate(tess, -theta, exact), u, atol=1e-10, rtol=0)


@pytest.mark.parametrize("zero_boundary", [True, False])
def test_2d_integration_agrees_with_fine_rk4_and_is_a_homeomorphism(zero_boundary):
    torch.manual_seed(2)
    tess = Tessellation((4, 4), zero_boundary)
    theta = torch.randn(2, tess.dim, dtype=torch.float64)
    u = _unit_grid(48).expand(2, -1, -1, -1)
    mapped = integrate(tess, theta, u, steps=50, substeps=10)
    fine = _rk4(tess, theta, u, 400)
    err = (mapped - fine).norm(dim=-1)
    assert float(err.max()) < 1e-4, float(err.max())  # domain units; measured ≈ 1e-5
    assert float((mapped - u).norm(dim=-1).mean()) > 0.02
    back = integrate(tess, -theta, mapped, steps=50, substeps=10)
    assert float((back - u).norm(dim=-1).max()) < 1e-4
    # orientation preserving: every finite-difference Jacobian of the fine map is positive
    m = integrate(tess, theta, _unit_grid(129).expand(2, -1, -1, -1))
    dx, dy = m[:, 1:, :-1] - m[:, :-1, :-1], m[:, :-1, 1:] - m[:, :-1, :-1]
    det = dx[..., 0] * dy[..., 1] - dx[..., 1] * dy[..., 0]
    assert float(det.min()) > 0


def test_gradients_match_finite_differences():
    torch.manual_seed(3)
    for cells in ((4,), (2, 2)):
        tess = Tessellation(cells, zero_boundary=False)
        theta = (0.5 * torch.randn(1, tess.dim, dtype=torch.float64)).requires_grad_()
        u = torch.rand(1, 7, len(cells), dtype=torch.float64)
        assert torch.autograd.gradcheck(
            lambda th, u=u, tess=tess: integrate(tess, th, u, steps=8, substeps=4),
            (theta,),
            eps=1e-6,
            atol=1e-5,
        )


def test_transform_on_a_world_grid_and_its_inverse():
    torch.manual_seed(4)
    grid = Grid((24, 32), spacing=(2.0, 1.5), origin=(10.0, -5.0))
    tess = Tessellation((3, 3))
    cpab = CPABTransform(tess, 0.5 * torch.randn(1, tess.dim), grid.shape)
    world = GridFrame(cpab, grid)
    u = world.voxel_displacement(grid)
    assert u.shape == (1, 2, 24, 32) and float(u.abs().max()) > 0.3
    pts = grid.world_points().unsqueeze(0)
    back = world.inverse()(world(pts))
    assert float((back - pts).norm(dim=-1).max()) < 1e-3  # mm
    # the field maps index points as the unit-domain integral does
    idx = grid.index_points().unsqueeze(0)
    scale = torch.tensor([23.0, 31.0])
    direct = integrate(tess, cpab.theta, idx / scale) * scale
    torch.testing.assert_close(cpab(idx), direct)


def test_parameters_can_be_optimized_per_pair(data_root):
    """Classical use: θ optimized by gradient descent recovers a known CPAB warp of a real
    image (ANTs' r16 slice at 1/4; the warped image is the target)."""
    torch.manual_seed(5)
    slice_ = downsample(read_image(data_root / "ants2d/r16slice.jpg"), 4.0)
    image = (slice_.data.float() / 255.0)[None]
    shape = tuple(image.shape[2:])
    tess = Tessellation((3, 3))
    truth = CPABTransform(tess, 0.8 * torch.randn(1, tess.dim), shape, steps=20, substeps=5)
    target = warp(image, truth.voxel_displacement(Grid(shape)))
    fit = CPABTransform(tess, torch.zeros(1, tess.dim), shape, 20, 5, learnable=True)
    opt = torch.optim.Adam(fit.parameters(), lr=0.05)
    before = float((image - target).pow(2).mean())
    for _ in range(60):
        loss = (warp(image, fit.voxel_displacement(Grid(shape))) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05 * before, (before, float(loss.detach()))  # measured 0.012
    true_field = truth.voxel_displacement(Grid(shape))
    error = (fit.voxel_displacement(Grid(shape)) - true_field).norm(dim=1)[0].detach()
    tissue = target[0, 0] > 0.05  # where the image shows the warp (background is flat)
    size = float(true_field.norm(dim=1)[0][tissue].mean())
    assert float(error[tissue].mean()) < 0.15 * size  # pixels; measured 0.22 of 3.1


def test_bad_inputs():
    with pytest.raises(ValueError, match="cells"):
        Tessellation((2, 2, 2))
    tess = Tessellation((2,))
    with pytest.raises(ValueError, match=r"\(N, 1\)"):
        tess.affine(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="points"):
        integrate(tess, torch.zeros(1, tess.dim), torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="grid sizes"):
        CPABTransform(tess, torch.zeros(1, tess.dim), (8, 8))
