from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.spatial import ThinPlateSpline, create_transform

DT = torch.float64


def _landmarks(d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.rand(1, k, d, generator=g, dtype=DT) * 100 - 50
    dst = src + torch.randn(1, k, d, generator=g, dtype=DT) * 4
    return src, dst


@pytest.mark.parametrize("d", [2, 3])
def test_interpolates_control_points(d: int) -> None:
    src, dst = _landmarks(d, 12)
    tps = ThinPlateSpline(src, dst)
    np.testing.assert_allclose(tps(src).numpy(), dst.numpy(), atol=1e-8)
    # float32 landmarks in mm still interpolate to float32 precision (float64 solve)
    tps32 = ThinPlateSpline(src.float(), dst.float())
    np.testing.assert_allclose(tps32(src.float()).numpy(), dst.numpy(), atol=1e-3)


@pytest.mark.parametrize("d", [2, 3])
def test_reproduces_affine_map(d: int) -> None:
    rng = np.random.default_rng(d)
    a, t = np.eye(d) + rng.normal(0, 0.1, (d, d)), rng.normal(0, 5, d)
    src, _ = _landmarks(d, 9)
    dst = src @ torch.tensor(a).T + torch.tensor(t)
    tps = ThinPlateSpline(src, dst)
    w, _ = tps.coefficients()
    assert w.abs().max() < 1e-10
    x = torch.rand(1, 30, d, dtype=DT) * 200 - 100
    np.testing.assert_allclose(tps(x)[0].numpy(), x[0].numpy() @ a.T + t, atol=1e-9)


def test_strong_regularization_tends_to_least_squares_affine() -> None:
    src, dst = _landmarks(2, 15, seed=3)
    x = torch.rand(1, 10, 2, dtype=DT) * 100 - 50
    p = np.c_[np.ones(15), src[0].numpy()]
    coef = np.linalg.lstsq(p, dst[0].numpy(), rcond=None)[0]
    fit = np.c_[np.ones(10), x[0].numpy()] @ coef
    got = ThinPlateSpline(src, dst, regularization=1e12)(x)[0].numpy()
    np.testing.assert_allclose(got, fit, atol=1e-4)
    exact = ThinPlateSpline(src, dst)(x)[0].numpy()
    assert np.abs(exact - fit).max() > 0.1  # the interpolating spline is not affine


def test_2d_kernel_known_solution() -> None:
    """Square corners fixed, centre moved: by symmetry the corner weights are equal and the
    centre's is -4x theirs (Σ w = 0), and the centre equation uses U(√2) = 2 log 2."""
    src = torch.tensor([[[-1.0, -1], [1, -1], [1, 1], [-1, 1], [0, 0]]], dtype=DT)
    dst = src.clone()
    dst[0, 4] = torch.tensor([0.3, 0.0], dtype=DT)
    tps = ThinPlateSpline(src, dst)
    w, a = tps.coefficients()
    # by symmetry the corner weights are equal (=c) and the centre one is -4c
    wx = w[0, :, 0].numpy()
    np.testing.assert_allclose(wx[:4], wx[0], atol=1e-12)
    np.testing.assert_allclose(wx[4], -4 * wx[0], atol=1e-12)
    # x-component at the centre: a0 + Σ w U(r); U(√2) = 2 log 2, U(0) = 0
    assert a[0, 0, 0].item() + 4 * wx[0] * 2 * np.log(2) == pytest.approx(0.3, abs=1e-12)


def test_gradcheck_and_parameters() -> None:
    src, dst = _landmarks(2, 5)
    src.requires_grad_()
    dst.requires_grad_()
    x = (torch.rand(1, 3, 2, dtype=DT) * 100 - 50).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, t, x: ThinPlateSpline(s, t)(x), (src, dst, x))
    s3, d3 = _landmarks(3, 5)
    x3 = (torch.rand(1, 2, 3, dtype=DT) * 100 - 50).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t, x: ThinPlateSpline(s3, t, regularization=0.5)(x), (d3.requires_grad_(), x3)
    )
    tps = create_transform(
        "TPS", source_points=src.detach(), target_points=dst.detach(), learnable=True
    )
    assert [n for n, _ in tps.named_parameters()] == ["target_points"]
    with pytest.raises(ValueError, match="at least 4"):
        ThinPlateSpline(torch.rand(1, 3, 3), torch.rand(1, 3, 3))
