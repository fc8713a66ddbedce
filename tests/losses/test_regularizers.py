"""Regularizers on dense fields: analytic fields, spacing, MONAI checks, robustness."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from learnreg.losses import functional as LF

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # MONAI indexing deprecations

REGULARIZERS = {
    "diffusion": LF.diffusion,
    "bending_energy": LF.bending_energy,
    "total_variation": LF.total_variation,
    "folding_penalty": LF.folding_penalty,
}


def coords(shape: tuple[int, ...], dtype=torch.float64) -> list[torch.Tensor]:
    """Index coordinates ``i_0, i_1[, i_2]`` of a grid, each of ``shape``."""
    return list(torch.meshgrid(*[torch.arange(s, dtype=dtype) for s in shape], indexing="ij"))


def field_from(components: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(components)[None]


def smooth_field(shape: tuple[int, ...], sigma: float, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    comps = [ndi.gaussian_filter(rng.standard_normal(shape), sigma) * sigma**2 for _ in shape]
    return torch.from_numpy(np.stack(comps)[None])


# ---------------------------------------------------------------------------- analytic fields
@pytest.mark.parametrize("shape", [(9, 11), (7, 8, 6)])
@pytest.mark.parametrize("spacing", [None, (2.0, 0.5, 1.5)])
def test_diffusion_and_tv_of_a_shear(shape, spacing):
    """u_0 = a·i_1 (voxels): ∂u_0/∂x_1 = a·s_0/s_1 is the only non-zero of D×D derivatives."""
    d = len(shape)
    sp = None if spacing is None else spacing[:d]
    a = 0.3
    x = coords(shape)
    u = field_from([a * x[1]] + [torch.zeros(shape)] * (d - 1))
    g = a * (1.0 if sp is None else sp[0] / sp[1])
    assert LF.diffusion(u, sp).item() == pytest.approx(g**2 / d**2, rel=1e-10)
    assert LF.total_variation(u, sp).item() == pytest.approx(g / d**2, rel=1e-10)
    assert LF.bending_energy(u, sp).item() == pytest.approx(0, abs=1e-20)  # linear


def test_diffusion_matches_voxelmorph_grad_l2():
    """VoxelMorph's Grad('l2'): mean over axes of mean((forward difference)²)."""
    u = smooth_field((10, 9, 8), 1.0)
    dy = u[:, :, 1:] - u[:, :, :-1]
    dx = u[:, :, :, 1:] - u[:, :, :, :-1]
    dz = u[:, :, :, :, 1:] - u[:, :, :, :, :-1]
    expected = ((dy**2).mean() + (dx**2).mean() + (dz**2).mean()) / 3
    assert LF.diffusion(u).item() == pytest.approx(expected.item(), rel=1e-12)
    expected_l1 = (dy.abs().mean() + dx.abs().mean() + dz.abs().mean()) / 3
    assert LF.total_variation(u).item() == pytest.approx(expected_l1.item(), rel=1e-12)


@pytest.mark.parametrize("spacing", [None, (2.0, 0.5, 1.25)])
def test_bending_energy_of_quadratic_fields(spacing):
    """u_0 = a·i_0², u_1 = b·i_0·i_2 in voxels on a 3D grid (three components):
    in mm, u_0 = a x_0² / s_0 and u_1 = b x_0 x_2 s_1 / (s_0 s_2), so
    BE = [(2a/s_0)² + 2 (b s_1 / (s_0 s_2))²] / 3 (mean over components)."""
    shape = (8, 7, 9)
    s = (1.0, 1.0, 1.0) if spacing is None else spacing
    a, b = 0.2, -0.7
    x = coords(shape)
    u = field_from([a * x[0] ** 2, b * x[0] * x[2], torch.zeros(shape)])
    expected = ((2 * a / s[0]) ** 2 + 2 * (b * s[1] / (s[0] * s[2])) ** 2) / 3
    assert LF.bending_energy(u, spacing).item() == pytest.approx(expected, rel=1e-10)


def test_bending_energy_2d_mixed_term_counts_twice():
    x = coords((10, 12))
    u = field_from([x[0] * x[1], torch.zeros(10, 12)])
    assert LF.bending_energy(u).item() == pytest.approx(2 * 1.0 / 2, rel=1e-12)


def test_folding_penalty():
    shape = (6, 7, 5)
    x = coords(shape)
    zero = torch.zeros(1, 3, *shape, dtype=torch.float64)
    flip = field_from([-2 * x[0], torch.zeros(shape), torch.zeros(shape)])  # x0 ↦ −x0: det −1
    squeeze = field_from([-0.75 * x[0], torch.zeros(shape), torch.zeros(shape)])  # det 0.25
    assert LF.folding_penalty(zero).item() == 0
    assert LF.folding_penalty(flip).item() == pytest.approx(1.0)
    assert LF.folding_penalty(squeeze).item() == 0
    assert LF.folding_penalty(squeeze, margin=0.5).item() == pytest.approx(0.25)
    # folding in half of the grid only
    half = flip.clone()
    half[..., 3:, :, :] = 0
    assert 0 < LF.folding_penalty(half).item() < 1
    # spacing does not change the determinant
    assert LF.folding_penalty(flip, (3.0, 1.0, 0.5)).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------- inverse consistency
def test_inverse_consistency_of_translations():
    shape = (9, 8, 7)
    t = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    fwd = t.expand(1, 3, *shape).clone()
    assert LF.inverse_consistency(fwd, -fwd).item() == pytest.approx(0, abs=1e-12)
    # backward = 0: the residual is t everywhere
    zero = torch.zeros_like(fwd)
    assert LF.inverse_consistency(fwd, zero).item() == pytest.approx(1.5**2 + 0.5**2 + 2**2)
    sp = (2.0, 1.0, 0.5)
    expected = (1.5 * 2) ** 2 + 0.5**2 + (2 * 0.5) ** 2
    assert LF.inverse_consistency(fwd, zero, sp).item() == pytest.approx(expected)


def test_inverse_consistency_of_an_affine_pair():
    """Forward: scaling by 0.8 about the centre (stays inside the grid); backward: its exact
    inverse, linear in x, hence exactly interpolated. A wrong backward field is penalized."""
    shape = (11, 9)
    c = torch.tensor([5.0, 4.0], dtype=torch.float64).view(2, 1, 1)
    x = torch.stack(coords(shape))
    fwd = ((0.8 - 1) * (x - c))[None]
    bwd = ((1 / 0.8 - 1) * (x - c))[None]
    assert LF.inverse_consistency(fwd, bwd).item() == pytest.approx(0, abs=1e-20)
    assert LF.inverse_consistency(fwd, -fwd).item() > 1e-3


# ---------------------------------------------------------------------------- MONAI
def test_bending_energy_matches_monai_on_quadratic_fields():
    """Both stencils are exact for quadratic fields: equal values."""
    monai = pytest.importorskip("monai")
    x = coords((9, 10, 8))
    u = field_from([0.3 * x[0] ** 2 - x[1] * x[2], 0.1 * x[1] ** 2, 0.5 * x[0] * x[1]])
    expected = monai.losses.BendingEnergyLoss()(u).item()
    assert LF.bending_energy(u).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("sigma,rtol", [(4.0, 0.07), (6.0, 0.05)])
def test_bending_energy_close_to_monai_on_smooth_random_fields(sigma, rtol):
    """Same definition; MONAI's wide central mixed stencil damps high frequencies a little more
    than our compact ones, so values agree to a few percent on smooth fields."""
    monai = pytest.importorskip("monai")
    u = smooth_field((40, 40, 40), sigma)
    expected = monai.losses.BendingEnergyLoss()(u).item()
    assert LF.bending_energy(u).item() == pytest.approx(expected, rel=rtol)


def test_diffusion_relates_to_monai_on_linear_fields():
    """MONAI's DiffusionLoss sums the D axes where ours averages them (VoxelMorph)."""
    monai = pytest.importorskip("monai")
    x = coords((8, 9, 7))
    u = field_from([0.2 * x[1] - 0.1 * x[2], 0.3 * x[0], 0.05 * x[0] + x[2]])
    expected = monai.losses.DiffusionLoss()(u).item()
    assert 3 * LF.diffusion(u).item() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("name", [*REGULARIZERS, "inverse_consistency"])
def test_finite_gradients_on_zero_fields(name):
    u = torch.zeros(2, 3, 6, 5, 4, requires_grad=True)
    value = LF.inverse_consistency(u, u) if name == "inverse_consistency" else REGULARIZERS[name](u)
    value.backward()
    assert value.item() == 0
    assert torch.isfinite(u.grad).all()


@pytest.mark.parametrize("name", [*REGULARIZERS, "inverse_consistency"])
def test_reduction_and_shape_errors(name):
    def fn(u, **kw):
        return (
            LF.inverse_consistency(u, u.flip(2), **kw)
            if name == "inverse_consistency"
            else REGULARIZERS[name](u, **kw)
        )

    u = smooth_field((8, 7), 1.0).repeat(3, 1, 1, 1) * torch.tensor([1.0, 2.0, 3.0]).view(
        3, 1, 1, 1
    )
    per_item = fn(u, reduction="none")
    assert per_item.shape == (3,)
    assert fn(u, reduction="sum").item() == pytest.approx(per_item.sum().item())
    assert fn(u).item() == pytest.approx(per_item.mean().item())
    with pytest.raises(ValueError, match="reduction"):
        fn(u, reduction="max")
    with pytest.raises(ValueError, match=r"\(N, D, \*S\)"):
        fn(torch.zeros(1, 3, 8, 7))  # 3 components on a 2D grid
    with pytest.raises(ValueError, match="spacing"):
        fn(u, spacing=(1.0, 1.0, 1.0))


def test_bending_energy_needs_three_voxels_per_axis():
    with pytest.raises(ValueError, match=">= 3"):
        LF.bending_energy(torch.zeros(1, 2, 2, 8))
