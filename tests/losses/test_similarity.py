"""Similarity losses: optima, alignment on a real slice, invariances, robustness, MONAI checks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from learnreg.losses import functional as LF
from learnreg.spatial import warp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # MONAI indexing deprecations

SIMILARITIES = {
    "ncc": LF.ncc,
    "lncc": LF.lncc,
    "lncc_gauss": lambda f, m, **kw: LF.lncc(f, m, window=5, kernel="gaussian", **kw),
    "mse": LF.mse,
    "l1": LF.l1,
    "mi": LF.mutual_information,
    "nmi": lambda f, m, **kw: LF.mutual_information(f, m, normalized=True, **kw),
    "ssim": LF.ssim,
}
MASKABLE = ("ncc", "lncc", "lncc_gauss", "mse", "l1", "mi", "nmi", "ssim")


@pytest.fixture(scope="module")
def slice2d(data_root) -> torch.Tensor:
    """r16 axial slice, 128×128 in [0, 1], as (1, 1, 128, 128)."""
    from PIL import Image

    arr = np.asarray(Image.open(data_root / "ants2d" / "r16slice.jpg").convert("L"), np.float32)
    return F.avg_pool2d(torch.from_numpy(arr / 255.0)[None, None], 2)


def shifted(img: torch.Tensor, k: int, c: int = 10) -> torch.Tensor:
    """Crop of ``img`` with a ``c``-voxel margin, moved by ``k`` voxels along axis 0."""
    return img[..., c + k : img.shape[-2] - c + k, c:-c]


def noise(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------- optima
def test_identical_images_reach_the_optimum():
    f = noise(2, 1, 20, 18, 16)
    assert LF.ncc(f, f).item() == pytest.approx(-1, abs=1e-5)
    assert LF.lncc(f, f).item() == pytest.approx(-1, abs=1e-5)
    assert LF.lncc(f, f, window=(3, 5, 7), kernel="gaussian").item() == pytest.approx(-1, abs=1e-5)
    assert LF.mse(f, f).item() == 0 and LF.l1(f, f).item() == 0
    assert LF.ssim(f, f).item() == pytest.approx(0, abs=1e-6)
    # MI(f, f) = H(f): the joint histogram is concentrated near its diagonal
    assert (
        LF.mutual_information(f, f).item()
        < LF.mutual_information(f, noise(2, 1, 20, 18, 16, seed=1)).item()
    )


@pytest.mark.parametrize("name", list(SIMILARITIES))
def test_loss_grows_with_misalignment_of_a_real_slice(slice2d, name):
    fn = SIMILARITIES[name]
    values = [fn(shifted(slice2d, 0), shifted(slice2d, k)).item() for k in (0, 1, 2, 4, 8)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values


@pytest.mark.parametrize("name", ["ncc", "lncc", "mi", "nmi", "mse", "ssim"])
def test_gradient_points_towards_alignment(slice2d, name):
    """One gradient step on a smooth shift parameter must move it back towards zero."""
    fixed = shifted(slice2d, 0)
    t = torch.tensor(1.5, requires_grad=True)
    disp = torch.zeros(1, 2, *fixed.shape[2:])
    moving = warp(fixed, disp + t * torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    SIMILARITIES[name](fixed, moving).backward()
    assert t.grad > 0  # the loss increases with t around t = 1.5, so descent decreases t


# ---------------------------------------------------------------------------- invariances
def test_ncc_invariant_to_affine_intensity_change(slice2d):
    f, m = shifted(slice2d, 0), shifted(slice2d, 3)
    base = LF.ncc(f, m).item()
    assert LF.ncc(f, 2.5 * m + 7.0).item() == pytest.approx(base, abs=1e-5)
    assert LF.ncc(1000 * f - 3, m).item() == pytest.approx(base, abs=1e-5)
    assert LF.ncc(1e-5 * f, 1e-5 * m).item() == pytest.approx(base, abs=1e-5)
    assert LF.ncc(f, -m).item() == pytest.approx(-base, abs=1e-5)  # anti-correlated


def test_lncc_invariant_to_scale_and_sign(slice2d):
    f, m = shifted(slice2d, 0), shifted(slice2d, 3)
    base = LF.lncc(f, m).item()
    assert LF.lncc(f, 300 * m).item() == pytest.approx(base, rel=1e-4)
    assert LF.lncc(1e-4 * f, 1e-4 * m).item() == pytest.approx(base, rel=1e-4)  # eps is relative
    assert LF.lncc(f, -m).item() == pytest.approx(base, rel=1e-4)  # squared correlation


@pytest.mark.parametrize("normalized", [False, True])
def test_mi_is_multimodal(slice2d, normalized):
    f = shifted(slice2d, 0)
    same = LF.mutual_information(f, f, normalized=normalized).item()
    inverted = LF.mutual_information(f, 1 - f, normalized=normalized).item()
    nonlinear = LF.mutual_information(f, torch.exp(-3 * f), normalized=normalized).item()
    misaligned = LF.mutual_information(f, 1 - shifted(slice2d, 4), normalized=normalized).item()
    assert inverted == pytest.approx(same, abs=1e-4)
    assert nonlinear < 0.9 * misaligned  # still far better than misaligned (values negative)
    if normalized:
        assert -2 <= same < -1  # NMI in [1, 2]


def test_mi_against_independent_histogram():
    """Parzen MI of two small images vs a numpy reimplementation of the same definition."""
    f, m = noise(1, 1, 9, 11), noise(1, 1, 9, 11, seed=3) ** 2
    bins, sigma = 8, 0.1

    def weights(x):
        x = (x - x.min()) / (x.max() - x.min())
        w = np.exp(-0.5 * ((x.ravel()[:, None] - np.linspace(0, 1, bins)) / sigma) ** 2)
        return w / w.sum(1, keepdims=True)

    p = weights(f.double().numpy()).T @ weights(m.double().numpy()) / f.numel()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    nmi = (-(pa * np.log(pa)).sum() - (pb * np.log(pb)).sum()) / -(p[nz] * np.log(p[nz])).sum()
    got = LF.mutual_information(f.double(), m.double(), bins=bins, sigma=sigma)
    got_n = LF.mutual_information(f.double(), m.double(), bins=bins, sigma=sigma, normalized=True)
    assert -got.item() == pytest.approx(mi, rel=1e-6)
    assert -got_n.item() == pytest.approx(nmi, rel=1e-6)


def test_mi_subsampling_approximates_full(slice2d):
    f, m = shifted(slice2d, 0), shifted(slice2d, 2)
    full = LF.mutual_information(f, m).item()
    torch.manual_seed(0)
    sub = [LF.mutual_information(f, m, samples=4000).item() for _ in range(2)]
    assert sub[0] != sub[1]
    assert all(abs(s - full) < 0.05 * abs(full) for s in sub)


# ---------------------------------------------------------------------------- masks
@pytest.mark.parametrize("name", ["ncc", "mse", "l1", "mi", "nmi"])
def test_mask_equals_loss_on_selected_voxels(slice2d, name):
    """Global losses with a mask = the loss of the masked voxels alone (as a K×1 image)."""
    f, m = shifted(slice2d, 0), shifted(slice2d, 2)
    mask = (f > 0.2).float()
    sel = mask.bool()
    expected = SIMILARITIES[name](f[sel].view(1, 1, -1, 1), m[sel].view(1, 1, -1, 1))
    assert SIMILARITIES[name](f, m, mask=mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_masked_lncc_averages_the_correlation_map_over_the_mask():
    """LNCC with a mask = the mean of MONAI's per-voxel squared-correlation map over the mask
    (and over channels)."""
    monai = pytest.importorskip("monai")
    f, m = noise(2, 2, 20, 17).double(), noise(2, 2, 20, 17, seed=1).double()
    mask = (noise(2, 1, 20, 17, seed=2) > 0.4).double()
    cc_map = -monai.losses.LocalNormalizedCrossCorrelationLoss(2, 5, reduction="none")(m, f)
    expected = (cc_map * mask).flatten(1).sum(1) / (2 * mask.flatten(1).sum(1))
    got = LF.lncc(f, m, window=5, mask=mask, reduction="none")
    torch.testing.assert_close(got, -expected, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("name", list(SIMILARITIES))
@pytest.mark.parametrize("kind", ["zeros", "constant", "zeros_vs_constant", "constant_vs_noise"])
def test_finite_values_and_gradients_on_degenerate_images(name, kind):
    shape = (2, 1, 12, 10, 8)
    z, c, r = torch.zeros(shape), torch.full(shape, 3.0), noise(*shape)
    f, m = {"zeros": (z, z), "constant": (c, c), "zeros_vs_constant": (z, c)}.get(kind, (c, r))
    f, m = f.clone().requires_grad_(), m.clone().requires_grad_()
    mask = torch.ones(1, 1, *shape[2:]) if name in MASKABLE else None
    kw = {"mask": mask} if mask is not None else {}
    value = SIMILARITIES[name](f, m, **kw)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(f.grad).all() and torch.isfinite(m.grad).all()


@pytest.mark.parametrize("name", list(SIMILARITIES))
def test_reduction_modes(name):
    f, m = noise(3, 2, 10, 12), noise(3, 2, 10, 12, seed=5)
    fn = SIMILARITIES[name]
    per_item = fn(f, m, reduction="none")
    assert per_item.shape == (3,)
    assert fn(f, m, reduction="sum").item() == pytest.approx(per_item.sum().item(), rel=1e-5)
    assert fn(f, m).item() == pytest.approx(per_item.mean().item(), rel=1e-5)
    assert per_item[1].item() == pytest.approx(fn(f[1:2], m[1:2]).item(), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        fn(f, m, reduction="avg")


@pytest.mark.parametrize("name", list(SIMILARITIES))
def test_shape_errors(name):
    fn = SIMILARITIES[name]
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9))
    with pytest.raises(ValueError, match="spatial dims"):
        fn(torch.rand(1, 8, 8), torch.rand(1, 8, 8))
    if name in MASKABLE:
        with pytest.raises(ValueError, match="mask"):
            fn(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), mask=torch.ones(2, 2, 8, 8))


def test_option_errors():
    f = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="kernel"):
        LF.lncc(f, f, kernel="gauss")
    with pytest.raises(ValueError, match="odd"):
        LF.lncc(f, f, window=4)
    with pytest.raises(ValueError, match="window"):
        LF.ssim(f, f, window=(3, 3, 3))
    with pytest.raises(ValueError, match="bins"):
        LF.mutual_information(f, f, bins=1)


# ---------------------------------------------------------------------------- gradcheck
def _gradcheck(fn, *inputs):
    """Full float64 gradcheck, single-threaded: BLAS threads only slow down tiny products."""
    inputs = [x.double().requires_grad_() for x in inputs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kernel", ["box", "gaussian"])
def test_lncc_gradcheck(kernel):
    f, m = noise(2, 2, 5, 6, 4), noise(2, 2, 5, 6, 4, seed=1)
    mask = (noise(1, 1, 5, 6, 4, seed=2) > 0.3).double()
    _gradcheck(lambda a, b: LF.lncc(a, b, window=(3, 5, 3), kernel=kernel, reduction="none"), f, m)
    _gradcheck(lambda b: LF.lncc(f.double(), b, window=3, kernel=kernel, mask=mask), m)


def test_mi_gradcheck():
    f, m = noise(2, 1, 6, 7), noise(2, 1, 6, 7, seed=1)
    _gradcheck(lambda a, b: LF.mutual_information(a, b, bins=6, reduction="none"), f, m)
    _gradcheck(lambda a, b: LF.mutual_information(a, b, bins=5, normalized=True), f, m)


def test_ssim_gradcheck():
    f, m = noise(2, 1, 7, 6), noise(2, 1, 7, 6, seed=1)
    _gradcheck(lambda a, b: LF.ssim(a, b, window=5, reduction="none"), f, m)
    _gradcheck(lambda a, b: LF.ssim(a, b, window=3, kernel="box", data_range=1.0), f, m)


# ---------------------------------------------------------------------------- MONAI
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kernel", ["box", "gaussian"])
@pytest.mark.parametrize("window", [3, 5, 9])
def test_lncc_matches_monai(ndim, kernel, window):
    """Same definition as MONAI (squared local correlation, zero padding, MONAI's Gaussian
    sigma = window / 3): equal on textured images, where the stabilizers don't matter."""
    monai = pytest.importorskip("monai")
    shape = (2, 1, 17, 15) if ndim == 2 else (2, 1, 13, 11, 9)
    f = noise(*shape).double()
    m = (0.5 * f + noise(*shape, seed=1).double()).requires_grad_()
    ref = monai.losses.LocalNormalizedCrossCorrelationLoss(
        ndim, window, {"box": "rectangular"}.get(kernel, kernel)
    )
    expected = ref(m, f)
    (g_ref,) = torch.autograd.grad(expected, m)
    got = LF.lncc(f, m, window=window, kernel=kernel)
    (g,) = torch.autograd.grad(got, m)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6 * g_ref.abs().max().item())


def test_lncc_vs_monai_on_real_slice(slice2d):
    """On the JPEG slice (59% exact zeros) only near-flat windows differ, by stabilizer."""
    monai = pytest.importorskip("monai")
    f, m = shifted(slice2d, 0).double(), shifted(slice2d, 2).double()
    expected = monai.losses.LocalNormalizedCrossCorrelationLoss(2, 9)(m, f).item()
    assert LF.lncc(f, m, eps=1e-14).item() == pytest.approx(expected, rel=0.01)
    assert LF.lncc(f, m).item() == pytest.approx(expected, rel=0.06)


@pytest.mark.parametrize("bins,ratio", [(23, None), (32, 1.0)])
def test_mi_matches_monai(bins, ratio):
    """MONAI's GlobalMutualInformationLoss (gaussian) clamps to [0, 1]; ours min-max
    normalizes: equal for images spanning exactly [0, 1]; our default sigma is MONAI's (half
    the bin spacing). Covers the chunked, checkpointed path (110k voxels > one block) and its
    gradient."""
    monai = pytest.importorskip("monai")

    def unit(x):
        return (x - x.min()) / (x.max() - x.min())

    f = unit(noise(1, 1, 48, 48, 48))
    m = unit((f + 0.3 * noise(1, 1, 48, 48, 48, seed=1)) ** 2).requires_grad_()
    ref = monai.losses.GlobalMutualInformationLoss(
        num_bins=bins, sigma_ratio=ratio or 0.5, smooth_nr=1e-10, smooth_dr=1e-10
    )(m, f)
    (g_ref,) = torch.autograd.grad(ref, m)
    got = LF.mutual_information(f, m, bins=bins, sigma=ratio and ratio / (bins - 1))
    (g,) = torch.autograd.grad(got, m)
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)
    inner = (m > m.min()) & (m < m.max())  # ours also differentiates through min and max
    torch.testing.assert_close(g[inner], g_ref[inner], rtol=0, atol=1e-5 * g_ref.abs().max().item())


@pytest.mark.parametrize("kernel,window", [("gaussian", 11), ("box", 7)])
def test_ssim_matches_monai(kernel, window):
    """MONAI averages SSIM over the valid region (no padding): use that region as mask."""
    monai = pytest.importorskip("monai")
    f = noise(2, 1, 30, 26)
    m = 0.7 * f + 0.3 * noise(2, 1, 30, 26, seed=1)
    ref = monai.losses.SSIMLoss(
        2, data_range=1.0, kernel_type={"box": "uniform"}.get(kernel, kernel), win_size=window
    )(m, f)
    r = window // 2
    mask = torch.zeros(1, 1, 30, 26)
    mask[..., r:-r, r:-r] = 1
    got = LF.ssim(f, m, window=window, kernel=kernel, sigma=1.5, data_range=1.0, mask=mask)
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)


# ---------------------------------------------------------------------------- Dice
@pytest.fixture(scope="module")
def label_slices(lpba) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial slice 80 of the LPBA40 label maps of S01 and S11, one-hot over their shared labels."""
    import nibabel as nib

    maps = [
        np.asarray(nib.load(lpba / "labels" / f"{s}.nii.gz").dataobj)[:, :, 80]
        for s in ("S01", "S11")
    ]
    values = np.intersect1d(*[np.unique(m) for m in maps])
    onehot = [torch.from_numpy(m[None] == values[:, None, None]).float()[None] for m in maps]
    return onehot[0], onehot[1]


def test_dice_of_squares():
    a, b = torch.zeros(1, 2, 10, 10), torch.zeros(1, 2, 10, 10)
    a[0, 1, 2:6, 2:6] = 1  # 16 voxels
    b[0, 1, 4:8, 2:6] = 1  # 16 voxels, 8 shared
    a[0, 0], b[0, 0] = 1 - a[0, 1], 1 - b[0, 1]  # background: 84 each, 76 shared
    fg, bg = 2 * 8 / 32, 2 * 76 / 168
    assert LF.dice(a, b, include_background=False).item() == pytest.approx(1 - fg, abs=1e-6)
    assert LF.dice(a, b).item() == pytest.approx(1 - (fg + bg) / 2, abs=1e-6)
    assert LF.dice(a, a).item() == pytest.approx(0, abs=1e-7)
    assert LF.dice(a[:, 1:], 1 - a[:, 1:]).item() == pytest.approx(1, abs=1e-6)  # disjoint


def test_dice_matches_monai(label_slices):
    monai = pytest.importorskip("monai")
    fixed, moving = label_slices
    for include in (True, False):
        expected = monai.metrics.DiceMetric(include_background=include)(moving, fixed).nanmean()
        got = LF.dice(fixed, moving, include_background=include, eps=0)
        assert got.item() == pytest.approx(1 - expected.item(), abs=1e-6)
    logits = torch.randn(2, 4, 12, 11, 9, generator=torch.Generator().manual_seed(0))
    p, q = logits.softmax(1), (2 * logits + torch.randn_like(logits)).softmax(1)
    for include in (True, False):
        ref = monai.losses.DiceLoss(include_background=include)(q, p)
        assert LF.dice(p, q, include_background=include).item() == pytest.approx(
            ref.item(), rel=1e-5
        )


def test_multiscale_dice_against_scipy_smoothing(label_slices):
    fixed, moving = (x[..., 40:120, 40:150] for x in label_slices)
    scales = (0, 1, 2, 4)
    per_scale = []
    for s in scales:
        p, q = fixed.double().numpy(), moving.double().numpy()
        if s > 0:  # zero padding, truncated at 3 sigma
            p, q = (
                ndi.gaussian_filter(x, (0, 0, s, s), mode="constant", truncate=3.0) for x in (p, q)
            )
        inter, total = (p * q).sum((2, 3)), p.sum((2, 3)) + q.sum((2, 3))
        per_scale.append(1 - ((2 * inter + 1e-5) / (total + 1e-5)).mean())
    got = LF.multiscale_dice(fixed.double(), moving.double(), scales=scales)
    assert got.item() == pytest.approx(np.mean(per_scale), rel=1e-6)
    assert LF.multiscale_dice(fixed, moving, scales=(0,)).item() == pytest.approx(
        LF.dice(fixed, moving).item()
    )


def test_multiscale_dice_decreases_with_alignment(label_slices):
    fixed = label_slices[0]
    values = [
        LF.multiscale_dice(
            fixed[..., 20:-20, :], fixed[..., 20 + k : fixed.shape[-2] - 20 + k, :]
        ).item()
        for k in (0, 2, 6, 12)
    ]
    # smoothed maps are soft: even identical maps score above 0, but alignment is the optimum
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values


@pytest.mark.parametrize("fn", [LF.dice, LF.multiscale_dice])
def test_dice_robustness(fn):
    z = torch.zeros(2, 3, 9, 8, 7, requires_grad=True)
    value = fn(z, z)
    value.backward()
    assert value.item() == pytest.approx(0, abs=1e-6) and torch.isfinite(z.grad).all()
    p = noise(3, 2, 9, 8).softmax(1)
    q = noise(3, 2, 9, 8, seed=1).softmax(1)
    per_item = fn(p, q, reduction="none")
    assert per_item.shape == (3,)
    assert fn(p, q, reduction="sum").item() == pytest.approx(per_item.sum().item(), rel=1e-6)
    assert fn(p, q).item() == pytest.approx(per_item.mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        fn(p, q, reduction="avg")
    with pytest.raises(ValueError, match=r"\(N, L, \*S\)"):
        fn(p, q[:, :1])
    with pytest.raises(ValueError, match="background"):
        LF.dice(p[:, :1], q[:, :1], include_background=False)


def test_dice_gradcheck():
    logits = noise(2, 3, 5, 6) * 4
    p, q = logits.softmax(1), (logits.flip(-1)).softmax(1)
    _gradcheck(lambda a, b: LF.dice(a, b, include_background=False, reduction="none"), p, q)
    _gradcheck(lambda a, b: LF.multiscale_dice(a, b, scales=(0, 0.7, 2)), p, q)
