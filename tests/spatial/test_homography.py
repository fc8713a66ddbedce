from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.spatial import Homography, create_transform

DT = torch.float64
SRC = torch.tensor([[[0.0, 0.0], [255.0, 0.0], [255.0, 255.0], [0.0, 255.0]]], dtype=DT)
DST = torch.tensor([[[10.0, -5.0], [240.0, 12.0], [270.0, 230.0], [-8.0, 250.0]]], dtype=DT)


def _svd_dlt(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Reference: homogeneous DLT (9 unknowns, null space by SVD), no normalization."""
    rows = []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows.append([-x, -y, -1, 0, 0, 0, u * x, u * y, u])
        rows.append([0, 0, 0, -x, -y, -1, v * x, v * y, v])
    h = np.linalg.svd(np.asarray(rows))[2][-1].reshape(3, 3)
    return h / h[2, 2]


def _project(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    q = np.c_[pts, np.ones(len(pts))] @ h.T
    return q[:, :2] / q[:, 2:]


def test_from_corners_maps_corners_and_matches_reference_dlt() -> None:
    t = Homography.from_corners(SRC, DST)
    np.testing.assert_allclose(t(SRC).numpy(), DST.numpy(), atol=1e-9)
    h = t.homogeneous()[0].numpy()
    assert h[2, 2] == 1.0
    np.testing.assert_allclose(h, _svd_dlt(SRC[0].numpy(), DST[0].numpy()), rtol=1e-8, atol=1e-10)
    pts = np.random.default_rng(0).uniform(0, 255, (20, 2))
    np.testing.assert_allclose(
        t(torch.tensor(pts)[None])[0].numpy(), _project(h, pts), rtol=1e-10, atol=1e-8
    )


def test_recovers_known_projective_matrix_batched() -> None:
    h = torch.tensor(
        [
            [[1.1, 0.2, 3.0], [-0.1, 0.9, 5.0], [1e-3, -5e-4, 1.0]],
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        ],
        dtype=DT,
    )
    src = SRC.expand(2, -1, -1)
    dst = Homography.from_matrix(h)(src)
    np.testing.assert_allclose(
        Homography.from_corners(src, dst).homogeneous().numpy(), h.numpy(), atol=1e-10
    )


def test_identity_inverse_and_scale_invariance() -> None:
    x = torch.rand(1, 5, 2, dtype=DT) * 100
    torch.testing.assert_close(Homography()(x.float()), x.float())
    t = Homography.from_corners(SRC, DST)
    np.testing.assert_allclose(t.inverse()(t(x)).numpy(), x.numpy(), atol=1e-9)
    scaled = Homography.from_matrix(3.0 * t.homogeneous())
    np.testing.assert_allclose(scaled.params.numpy(), t.params.numpy(), atol=1e-12)


def test_gradients() -> None:
    dst = DST.clone().requires_grad_()
    x = torch.rand(1, 3, 2, dtype=DT) * 255
    assert torch.autograd.gradcheck(lambda d: Homography.from_corners(SRC, d)(x), (dst,))
    p = (1e-3 * torch.randn(2, 8, dtype=DT)).requires_grad_()
    x2 = (torch.rand(2, 3, 2, dtype=DT) * 10).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, x: Homography.from_params(p)(x), (p, x2))
    assert [n for n, _ in Homography(learnable=True).named_parameters()] == ["params"]


def test_errors_and_factory() -> None:
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        Homography.from_params(torch.zeros(1, 9))
    with pytest.raises(ValueError, match="2D points"):
        Homography()(torch.zeros(1, 4, 3))
    assert isinstance(create_transform("homography"), Homography)
