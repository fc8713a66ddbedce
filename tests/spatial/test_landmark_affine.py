"""Affine fits to point correspondences: exact least squares, RANSAC through outliers."""

from __future__ import annotations

import pytest
import torch

from learnreg.spatial.landmark_affine import fit_affine, ransac_affine


def _truth(ndim: int, g: torch.Generator) -> torch.Tensor:
    m = torch.eye(ndim + 1, dtype=torch.float64)
    m[:ndim, :ndim] += 0.2 * torch.randn(ndim, ndim, generator=g, dtype=torch.float64)
    m[:ndim, ndim] = 10 * torch.randn(ndim, generator=g, dtype=torch.float64)
    return m


def _apply(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    d = p.shape[1]
    return p @ m[:d, :d].T + m[:d, d]


@pytest.mark.parametrize("ndim", [2, 3])
def test_least_squares_is_exact_on_exact_points(ndim) -> None:
    g = torch.Generator().manual_seed(0)
    m = _truth(ndim, g)
    p = 50 * torch.rand(12, ndim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fit_affine(p, _apply(m, p)), m)


@pytest.mark.parametrize("ndim", [2, 3])
def test_ransac_recovers_the_affine_through_outliers(ndim) -> None:
    g = torch.Generator().manual_seed(1)
    m = _truth(ndim, g)
    p = 100 * torch.rand(40, ndim, generator=g, dtype=torch.float64)
    q = _apply(m, p) + 0.3 * torch.randn(40, ndim, generator=g, dtype=torch.float64)
    bad = torch.arange(40) % 3 == 0  # a third of the matches are wrong by 20-60 mm
    q[bad] += 20 + 40 * torch.rand(int(bad.sum()), ndim, generator=g, dtype=torch.float64)
    fitted, inliers = ransac_affine(p, q, threshold=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inliers, ~bad)
    err = (_apply(fitted, p) - _apply(m, p)).norm(dim=1).max()
    naive = (_apply(fit_affine(p, q), p) - _apply(m, p)).norm(dim=1).max()
    assert float(err) < 0.5 < float(naive)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="at least 4 points"):
        fit_affine(torch.rand(3, 3), torch.rand(3, 3))
    with pytest.raises(ValueError, match="point sets must both be"):
        ransac_affine(torch.rand(5, 3), torch.rand(5, 2), 1.0)
    with pytest.raises(ValueError, match="threshold"):
        ransac_affine(torch.rand(5, 3), torch.rand(5, 3), 0.0)
    with pytest.raises(ValueError, match="finite"):
        fit_affine(torch.full((5, 2), float("nan")), torch.rand(5, 2))
