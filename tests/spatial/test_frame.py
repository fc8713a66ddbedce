"""Index-space transforms in world space, voxel displacements, results from predicted
transforms: against closed forms computed with numpy and against the generic sampling path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.base import TransformChain
from learnreg.spatial.bspline import BSplineTransform
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.frame import GridFrame, index_matrix_to_world, world_matrix_to_index
from learnreg.spatial.homography import Homography
from learnreg.spatial.linear import Affine
from learnreg.spatial.result import RegistrationResult, split_linear
from learnreg.spatial.svf import StationaryVelocityField
from learnreg.spatial.tps import ThinPlateSpline


def oblique(shape, seed=0) -> Grid:
    rng = np.random.default_rng(seed)
    d = len(shape)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    spacing = rng.uniform(0.7, 2.5, d)
    return Grid(tuple(shape), tuple(spacing), tuple(rng.uniform(-50, 50, d)), tuple(map(tuple, q)))


def random_matrix(d: int, seed: int, batch: int = 1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    m = np.tile(np.eye(d + 1), (batch, 1, 1))
    m[:, :d, :d] += rng.normal(scale=0.1, size=(batch, d, d))
    m[:, :d, d] = rng.normal(scale=3.0, size=(batch, d))
    return torch.tensor(m)


@pytest.mark.parametrize("shape", [(9, 12), (6, 7, 5)])
def test_index_matrix_maps_world_points_through_the_grid(shape):
    grid, d = oblique(shape), len(shape)
    m_idx = random_matrix(d, 1)
    world = torch.tensor(np.random.default_rng(2).normal(scale=40, size=(1, 17, d)))
    ours = AffineTransform(index_matrix_to_world(m_idx, grid))(world)
    a = grid.affine
    idx = (world[0].numpy() - a[:d, d]) @ np.linalg.inv(a[:d, :d]).T
    mapped = idx @ m_idx[0, :d, :d].numpy().T + m_idx[0, :d, d].numpy()
    ref = mapped @ a[:d, :d].T + a[:d, d]
    np.testing.assert_allclose(ours[0].numpy(), ref, atol=1e-9)
    back = world_matrix_to_index(index_matrix_to_world(m_idx, grid), grid)
    assert torch.allclose(back, m_idx, atol=1e-12)


def test_index_matrix_is_differentiable():
    grid = oblique((8, 8))
    p = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
    m = Affine.from_params(p, center=torch.tensor(grid.index_center)).homogeneous()
    AffineTransform(index_matrix_to_world(m, grid)).voxel_displacement(grid).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(9, 12), (6, 7, 5)])
def test_voxel_displacement_of_an_affine_is_closed_form(shape):
    grid, d = oblique(shape, 3), len(shape)
    m_idx = random_matrix(d, 4, batch=2).float()
    u = AffineTransform(index_matrix_to_world(m_idx, grid)).voxel_displacement(grid)
    pts = grid.index_points(torch.float64)
    for n in range(2):
        ref = pts @ m_idx[n, :d, :d].double().T + m_idx[n, :d, d].double() - pts
        assert torch.allclose(u[n].movedim(0, -1).double(), ref, atol=2e-4)


def test_field_fast_paths_equal_world_sampling():
    fine = oblique((17, 21, 9), 5)
    coarse = fine.resized((9, 11, 5))
    torch.manual_seed(0)
    field = torch.randn(2, 3, *coarse.shape)
    for t in (DisplacementField(coarse, field), StationaryVelocityField(coarse, 0.3 * field, 4)):
        fast = t.voxel_displacement(fine)
        generic = super(type(t), t).voxel_displacement(fine)
        assert torch.allclose(fast, generic, atol=1e-4), type(t).__name__
    spline = BSplineTransform(
        fine, 4, params=torch.randn(1, 3, *BSplineTransform(fine, 4).control_shape)
    )
    assert torch.allclose(spline.voxel_displacement(fine), spline.voxel_field())
    other = oblique((10, 10, 10), 6)  # another grid: sampled, zero outside the field's grid
    u = DisplacementField(coarse, field).voxel_displacement(other)
    assert u.shape == (2, 3, 10, 10, 10)


def test_grid_frame_is_the_index_space_spline_in_world_space():
    grid = oblique((20, 16), 7)
    src = grid.index_lattice(3, torch.float64)
    dst = src + torch.tensor(np.random.default_rng(8).normal(scale=1.5, size=src.shape))
    inner = ThinPlateSpline(src, dst)
    frame = GridFrame(inner, grid)
    world = grid.world_points(torch.float64).reshape(1, -1, 2)
    mapped = frame(world)
    ref = grid.index_to_world(inner(grid.world_to_index(world)))
    assert torch.allclose(mapped, ref, atol=1e-8)
    # on its own grid the voxel displacement is the spline's displacement of index points
    u = frame.voxel_displacement(grid)
    pts = grid.index_points(torch.float64)
    ref_u = inner(pts.reshape(1, -1, 2)).reshape(*pts.shape) - pts
    assert torch.allclose(u[0].movedim(0, -1).double(), ref_u, atol=1e-4)
    # no closed-form inverse: the dense field's iterative inverse undoes it inside the grid
    inv = frame.inverse()
    inside = grid.index_to_world(pts[3:-3, 3:-3].reshape(1, -1, 2)).float()
    moved = frame(inside)
    error = (inv(moved) - inside).norm(dim=-1).max()
    assert error < 0.05 * (moved - inside).norm(dim=-1).max(), error  # linear interpolation


def test_result_from_a_chain_splits_linear_and_deformable_parts():
    fixed, moving = oblique((24, 20), 9), oblique((22, 26), 10)
    torch.manual_seed(1)
    v = 0.2 * torch.nn.functional.avg_pool2d(torch.randn(1, 2, 12, 10), 3, 1, 1)
    svf = StationaryVelocityField(fixed.resized((12, 10)), v, 6)
    a1 = AffineTransform(random_matrix(2, 11).float())
    a2 = AffineTransform(random_matrix(2, 12).float())
    then = AffineTransform(random_matrix(2, 13).float())
    chain = TransformChain([svf, a1, a2])
    head, linear = split_linear(chain)
    assert head is svf
    ref = a2.homogeneous()[0].double() @ a1.homogeneous()[0].double()
    assert torch.allclose(linear.homogeneous()[0].double(), ref, atol=1e-6)
    result = RegistrationResult.from_transform(chain, fixed, moving, then=then)
    pts = fixed.world_points().reshape(1, -1, 2)[:, ::7]
    expected = then(chain(pts))
    assert torch.allclose(result.map_points(pts[0]), expected[0], atol=1e-3)
    # the inverse is exp(-v): the result's round trip is the velocity field's own
    inner = fixed.world_points()[4:-4, 4:-4].reshape(-1, 2)
    back = result.map_points(result.map_points(inner), inverse=True)
    own = (svf.inverse()(svf(inner[None]))[0] - inner).norm(dim=-1).max()  # exp(-v)∘exp(v)
    assert (back - inner).norm(dim=-1).max() < own + 0.05, own  # + fixed-grid resampling
    # a purely linear prediction gives a result without fields (written as a .mat)
    lin = RegistrationResult.from_transform(a1, fixed, moving, then=then)
    assert lin.deformable is None and lin.inverse_deformable is None
    ref = then.homogeneous()[0] @ a1.homogeneous()[0]
    assert torch.allclose(lin.affine.homogeneous()[0], ref, atol=1e-6)


def test_result_from_a_homography_keeps_it_in_the_field_with_its_exact_inverse():
    fixed = oblique((16, 16), 14)
    h = torch.eye(3)[None].clone()
    h[0, 2, :2] = torch.tensor([1e-3, -2e-3])
    h[0, 0, 2] = 2.0
    t = Homography.from_matrix(index_matrix_to_world(h, fixed))
    result = RegistrationResult.from_transform(t, fixed, fixed)
    assert result.deformable is not None
    pts = fixed.world_points()[3:-3, 3:-3].reshape(1, -1, 2)  # whose images stay on the grid
    assert torch.allclose(result.map_points(pts[0]), t(pts)[0], atol=1e-3)
    assert torch.allclose(result.map_points(t(pts)[0], inverse=True), pts[0], atol=5e-3)
