from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.spatial import StationaryVelocityField, create_transform, integrate_velocity

from ._reference import compose, identity, sample_linear, smooth_field

DT = torch.float64


@pytest.mark.parametrize("shape", [(9, 11), (5, 6, 7)])
def test_constant_velocity_is_translation(shape: tuple[int, ...]) -> None:
    c = torch.tensor([1.7, -2.3, 0.4][: len(shape)], dtype=DT).view(1, -1, *[1] * len(shape))
    v = c.expand(2, -1, *shape)
    u = integrate_velocity(v, steps=6)
    np.testing.assert_allclose(u.numpy(), v.numpy(), atol=1e-12)


def test_exp_v_composed_with_exp_minus_v_is_identity() -> None:
    v = smooth_field((48, 48), amplitude=3.0)
    u = integrate_velocity(torch.tensor(v)[None], steps=7)[0].numpy()
    ui = integrate_velocity(torch.tensor(-v)[None], steps=7)[0].numpy()
    assert np.abs(u).max() > 2.0
    assert np.abs(compose(u, ui)).max() < 0.05  # scipy composition, not our sampler
    assert np.abs(compose(ui, u)).max() < 0.05


def test_scaling_and_squaring_matches_rk4_flow() -> None:
    """exp(v) against an independent RK4 integration of dx/dt = v(x) (scipy interpolation)."""
    v = smooth_field((40, 44), amplitude=2.5, seed=3)
    x0 = identity(v.shape[1:])
    x, h = x0.copy(), 1.0 / 64
    for _ in range(64):
        k1 = sample_linear(v, x)
        k2 = sample_linear(v, x + h / 2 * k1)
        k3 = sample_linear(v, x + h / 2 * k2)
        k4 = sample_linear(v, x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    u = integrate_velocity(torch.tensor(v)[None], steps=8)[0].numpy()
    assert np.abs(u - (x - x0)).max() < 0.02


def test_transform_world_points_and_inverse() -> None:
    rot = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    grid = Grid((32, 36), spacing=(1.5, 0.8), origin=(-20.0, 7.0), direction=rot)
    v = torch.tensor(smooth_field(grid.shape, amplitude=2.0, seed=1))[None]
    svf = StationaryVelocityField(grid, v, steps=7)
    pts = grid.world_points(DT)[None]
    expect = pts + grid.index_vectors_to_world(integrate_velocity(v, 7).movedim(1, -1))
    np.testing.assert_allclose(svf(pts).numpy(), expect.numpy(), atol=1e-10)
    inner = pts[:, 6:-6, 6:-6]
    back = svf.inverse()(svf(inner))
    assert (back - inner).norm(dim=-1).max() < 0.05 * max(grid.spacing)


def test_parameters_and_gradients() -> None:
    grid = Grid((6, 7))
    assert [n for n, _ in StationaryVelocityField(grid, learnable=True).named_parameters()] == [
        "velocity"
    ]
    assert isinstance(create_transform("SVF", grid), StationaryVelocityField)
    v = (0.7 * torch.randn(1, 2, 6, 7, dtype=DT)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: integrate_velocity(v, steps=3), (v,))
    v3 = (0.5 * torch.randn(1, 3, 3, 4, 4, dtype=DT)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: integrate_velocity(v, steps=2), (v3,))
    # supplied by a "network": gradients reach it through the points map
    net = torch.randn(1, 2, 6, 7, requires_grad=True)
    StationaryVelocityField(grid, net)(grid.world_points()[None]).sum().backward()
    assert net.grad is not None and net.grad.abs().sum() > 0
