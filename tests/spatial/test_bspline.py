from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline

from learnreg.core.grid import Grid
from learnreg.spatial import BSplineTransform, bspline_kernel, create_transform
from learnreg.spatial.bspline import control_lattice_shape

from ._reference import identity

DT = torch.float64


def test_kernel_values_and_partition_of_unity() -> None:
    k = bspline_kernel(4, DT)
    assert k.shape == (15,)
    assert k[7].item() == pytest.approx(2 / 3) and k[3].item() == pytest.approx(1 / 6)
    # samples one control spacing apart sum to one, for every phase
    np.testing.assert_allclose(torch.nn.functional.pad(k, (0, 1)).view(4, 4).sum(0), 1.0)


@pytest.mark.parametrize(
    ("shape", "spacing"), [((23, 17), (4, 3)), ((16, 9), (5, 8)), ((11, 14, 9), (3, 4, 2))]
)
def test_constant_and_linear_coefficients_reproduced(shape: tuple[int, ...], spacing) -> None:
    d = len(shape)
    grid = Grid(shape)
    cshape = control_lattice_shape(shape, spacing)
    const = torch.tensor([1.25, -0.5, 2.0][:d], dtype=DT).view(1, d, *[1] * d)
    field = BSplineTransform(grid, spacing, const.expand(2, d, *cshape).clone()).voxel_field()
    np.testing.assert_allclose(field.numpy(), const.expand_as(field).numpy(), atol=1e-12)
    # linear ramp: control k along axis a sits at index (k - 1) * s_a
    pos = identity(cshape) - 1.0
    pos = pos * np.asarray(spacing, dtype=np.float64).reshape(d, *[1] * d)
    a = np.random.default_rng(0).normal(size=(d, d))
    b = np.random.default_rng(1).normal(size=d)
    coef = np.einsum("ij,j...->i...", a, pos) + b.reshape(d, *[1] * d)
    field = BSplineTransform(grid, spacing, torch.tensor(coef)[None]).voxel_field()[0]
    expect = np.einsum("ij,j...->i...", a, identity(shape)) + b.reshape(d, *[1] * d)
    np.testing.assert_allclose(field.numpy(), expect, atol=1e-10)


def test_matches_scipy_tensor_product_bspline() -> None:
    shape, spacing = (19, 26), (4, 5)
    cshape = control_lattice_shape(shape, spacing)
    coef = np.random.default_rng(2).normal(size=(2, *cshape))

    def basis(n: int, s: int, c: int) -> np.ndarray:
        knots = (np.arange(c + 4) - 3.0) * s  # basis k centred on (k - 1) s
        return BSpline.design_matrix(np.arange(n, dtype=np.float64), knots, 3).toarray()

    b0, b1 = (basis(n, s, c) for n, s, c in zip(shape, spacing, cshape, strict=True))
    expect = np.einsum("ik,jl,ckl->cij", b0, b1, coef)
    got = BSplineTransform(Grid(shape), spacing, torch.tensor(coef)[None]).voxel_field()[0]
    np.testing.assert_allclose(got.numpy(), expect, atol=1e-12)


def test_points_shape_inference_and_errors() -> None:
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])
    grid = Grid((20, 15), spacing=(0.8, 1.5), origin=(4.0, -3.0), direction=rot)
    params = torch.randn(1, 2, *control_lattice_shape(grid.shape, (5, 5)), dtype=DT)
    t = BSplineTransform(grid, params=params)  # spacing inferred from the lattice
    assert t.control_spacing == (5, 5)
    pts = grid.world_points(DT)[None]
    expect = pts + grid.index_vectors_to_world(t.voxel_field().movedim(1, -1))
    np.testing.assert_allclose(t(pts).numpy(), expect.numpy(), atol=1e-10)
    with pytest.raises(ValueError, match="does not cover"):
        BSplineTransform(grid, control_shape=(9, 4))
    with pytest.raises(ValueError, match="needs control_spacing"):
        BSplineTransform(grid)
    ffd = create_transform("FFD", grid, control_spacing=4, learnable=True)
    assert isinstance(ffd, BSplineTransform)
    assert [n for n, _ in ffd.named_parameters()] == ["params"]


@pytest.mark.parametrize(("shape", "spacing"), [((7, 6), (3, 2)), ((5, 4, 6), (2, 3, 2))])
def test_gradcheck(shape: tuple[int, ...], spacing) -> None:
    grid = Grid(shape)
    cshape = control_lattice_shape(shape, spacing)
    p = torch.randn(1, len(shape), *cshape, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p: BSplineTransform(grid, spacing, p).voxel_field(), (p,), fast_mode=True
    )
