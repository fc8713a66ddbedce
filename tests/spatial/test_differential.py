from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.spatial.differential import jacobian_determinant, jacobian_matrix, spatial_gradient

DT = torch.float64


def _rotation(d: int, seed: int) -> np.ndarray:
    q = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))[0]
    return q * np.sign(np.linalg.det(q))


@pytest.mark.parametrize(
    ("shape", "spacing", "rotated"),
    [
        ((12, 14), (1.0, 1.0), False),
        ((12, 14), (0.6, 2.5), True),
        ((8, 9, 10), (1.0, 1.0, 1.0), False),
        ((8, 9, 10), (1.2, 0.5, 3.0), True),
    ],
)
def test_affine_field_determinant_is_det_a(shape, spacing, rotated: bool) -> None:
    """World map x ↦ A x + t on any grid: det of the voxel-unit field's Jacobian is det A."""
    d = len(shape)
    direction = _rotation(d, 0) if rotated else np.eye(d)
    grid = Grid(shape, spacing, origin=tuple(range(d)), direction=direction)
    a = np.eye(d) + np.random.default_rng(1).normal(0, 0.2, (d, d))
    x = grid.world_points(DT)
    disp_mm = x @ torch.tensor(a - np.eye(d)).T + torch.tensor(np.arange(1.0, d + 1))
    vox = grid.world_vectors_to_index(disp_mm).movedim(-1, 0)[None]
    det = jacobian_determinant(vox)
    np.testing.assert_allclose(det.numpy(), np.linalg.det(a), rtol=1e-10)
    if not rotated:  # mm along the index axes, derivatives per mm
        det_mm = jacobian_determinant(disp_mm.movedim(-1, 0)[None], spacing)
        np.testing.assert_allclose(det_mm.numpy(), np.linalg.det(a), rtol=1e-10)


def test_folding_field_has_negative_determinant() -> None:
    x = torch.arange(20, dtype=DT)
    u = torch.zeros(1, 2, 20, 20, dtype=DT)
    u[0, 0] = (-1.5 * x[:, None] + 15).clamp(min=-4, max=4)  # compresses axis 0 past zero
    det = jacobian_determinant(u)
    assert det[0, 10, 5].item() == pytest.approx(-0.5)
    assert det[0, 0, 5].item() == pytest.approx(1.0)


def test_gradient_exact_for_quadratics_inside() -> None:
    i, j = torch.meshgrid(torch.arange(9, dtype=DT), torch.arange(7, dtype=DT), indexing="ij")
    f = (i**2 + 3 * i * j)[None, None]
    g = spatial_gradient(f, spacing=(2.0, 0.5))
    np.testing.assert_allclose(g[0, 0, 0, 1:-1].numpy(), ((2 * i + 3 * j) / 2.0)[1:-1].numpy())
    np.testing.assert_allclose(g[0, 0, 1, :, 1:-1].numpy(), (3 * i / 0.5)[:, 1:-1].numpy())
    fwd = spatial_gradient(f, mode="forward")
    np.testing.assert_allclose(fwd[0, 0, 0, :-1].numpy(), (2 * i + 1 + 3 * j)[:-1].numpy())
    with pytest.raises(ValueError, match="mode"):
        spatial_gradient(f, mode="backward")


@pytest.mark.parametrize("d", [2, 3])
def test_determinant_of_a_random_field_matches_numpy(d: int) -> None:
    g = torch.Generator().manual_seed(d)
    u = torch.randn(2, d, *([9] * d), generator=g, dtype=torch.float64)
    j = jacobian_matrix(u).movedim(1, -1).movedim(1, -1).numpy()  # (N, *S, D, D)
    np.testing.assert_allclose(jacobian_determinant(u).numpy(), np.linalg.det(j), rtol=1e-10)
