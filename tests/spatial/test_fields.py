from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.spatial import (
    DisplacementField,
    compose_displacements,
    create_transform,
    invert_displacement,
    resize_displacement,
)

from ._reference import identity, sample_linear, smooth_field

DT = torch.float64


def _affine_field(shape: tuple[int, ...], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``u(x) = A x + b`` on index points, ``(D, *S)``."""
    x = identity(shape)
    return np.einsum("ij,j...->i...", a, x) + b.reshape(-1, *[1] * len(shape))


def test_compose_order_with_affine_fields() -> None:
    """w(x) = v(x) + u(x + v(x)): v first, then u (exact for fields linear in x)."""
    shape = (20, 24)
    a, b = np.array([[0.02, -0.01], [0.03, 0.01]]), np.array([0.3, -0.2])
    c, e = np.array([[-0.015, 0.02], [0.01, 0.025]]), np.array([-0.1, 0.4])
    u, v = _affine_field(shape, a, b), _affine_field(shape, c, e)
    x = identity(shape)
    expect = np.einsum("ij,j...->i...", c, x) + e.reshape(2, 1, 1)
    expect = expect + np.einsum("ij,j...->i...", a, x + v) + b.reshape(2, 1, 1)
    w = compose_displacements(torch.tensor(u)[None], torch.tensor(v)[None])[0].numpy()
    inner = (slice(None), slice(2, -2), slice(2, -2))  # x + v(x) stays inside the grid
    np.testing.assert_allclose(w[inner], expect[inner], atol=1e-12)
    swapped = compose_displacements(torch.tensor(v)[None], torch.tensor(u)[None])[0].numpy()
    assert np.abs(swapped[inner] - expect[inner]).max() > 1e-3


def test_displacement_field_compose_equals_chain() -> None:
    grid = Grid((18, 20, 16), spacing=(1.2, 0.9, 2.0), origin=(3.0, -5.0, 10.0))
    u = DisplacementField(grid, torch.tensor(smooth_field(grid.shape, 1.5, seed=1))[None])
    v = DisplacementField(grid, torch.tensor(smooth_field(grid.shape, 1.5, seed=2))[None])
    pts = grid.world_points(DT)[None]
    np.testing.assert_allclose(u.compose(v)(pts).numpy(), u(v(pts)).numpy(), atol=1e-10)


@pytest.mark.parametrize("shape", [(40, 36), (20, 22, 18)])
def test_invert_displacement_residual(shape: tuple[int, ...]) -> None:
    u = smooth_field(shape, amplitude=2.5, seed=4)
    res = invert_displacement(torch.tensor(u)[None], iterations=50, tolerance=1e-4)
    assert res.residual.shape == (1,) and res.residual.item() < 1e-4
    assert 0 < res.iterations < 50
    w = res.displacement[0].numpy()
    # independent check with scipy: (id + u) ∘ (id + w) = id
    r = w + sample_linear(u, identity(shape) + w)
    assert np.linalg.norm(r, axis=0).max() < 0.05
    # too few iterations: the reported residual says so
    assert invert_displacement(torch.tensor(u)[None], iterations=1).residual.item() > 0.05


def test_displacement_field_inverse_world() -> None:
    grid = Grid((30, 34), spacing=(0.7, 1.3), origin=(-4.0, 2.0))
    u = DisplacementField(grid, torch.tensor(smooth_field(grid.shape, 2.0, seed=5))[None])
    pts = grid.world_points(DT)[None, 5:-5, 5:-5]
    assert (u(u.inverse()(pts)) - pts).norm(dim=-1).max() < 0.05


@pytest.mark.parametrize(("shape", "new"), [((17, 21), (33, 11)), ((9, 13, 11), (17, 7, 21))])
def test_resize_displacement_world_affine(shape: tuple[int, ...], new: tuple[int, ...]) -> None:
    """An affine world displacement stays the same world field on the resized grid."""
    d = len(shape)
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))[0]
    grid = Grid(shape, spacing=(1.3, 0.6, 2.1)[:d], origin=(5.0, -2.0, 1.0)[:d], direction=q)
    m, t = np.random.default_rng(1).normal(0, 0.05, (d, d)), np.array([1.0, -2.0, 0.5][:d])

    def world_disp(g: Grid) -> torch.Tensor:
        x = g.world_points(DT)
        return x @ torch.tensor(m).T + torch.tensor(t)  # (*S, D) mm

    vox = grid.world_vectors_to_index(world_disp(grid)).movedim(-1, 0)[None]
    out = resize_displacement(vox, new)
    g2 = grid.resized(new)
    got = g2.index_vectors_to_world(out[0].movedim(0, -1))
    np.testing.assert_allclose(got.numpy(), world_disp(g2).numpy(), atol=1e-10)


def test_factory_and_errors() -> None:
    grid = Grid((5, 6))
    assert isinstance(create_transform("DDF", grid, batch=2), DisplacementField)
    with pytest.raises(ValueError, match="needs a grid"):
        create_transform("displacement")
    with pytest.raises(ValueError, match="differ in shape"):
        compose_displacements(torch.zeros(1, 2, 5, 6), torch.zeros(1, 2, 5, 7))
