"""Metrics against independent references: SimpleITK, surface-distance's lookup tables (as
shipped in MONAI), brute-force nearest neighbours, analytic fields."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from learnreg.metrics import (
    dice_per_label,
    hausdorff_distance,
    hd95,
    inverse_consistency_error,
    jacobian_stats,
    mean_dice,
    tre,
)
from learnreg.metrics.surface import _surfel_table
from learnreg.spatial.affine import AffineTransform

SPACING = (1.2, 0.9, 2.0)  # anisotropic, set on the real 1 mm label maps


@pytest.fixture(scope="module")
def lpba_pair(lpba):
    """S01 (fixed) and S35 label maps, central 64³ crop (labels cut by the crop included)."""
    sl = (slice(48, 112), slice(64, 128), slice(48, 112))
    f = np.asarray(nib.load(lpba / "labels" / "S01.nii.gz").dataobj)[sl]
    m = np.asarray(nib.load(lpba / "labels" / "S35.nii.gz").dataobj)[sl]
    return f, m


def _sitk(a: np.ndarray, spacing) -> sitk.Image:
    """Index order (i, j, k) -> SimpleITK (x, y, z) with the given spacing."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(a.T))
    img.SetSpacing(tuple(float(s) for s in spacing))
    return img


# ---------------------------------------------------------------------------- Dice
def test_dice_matches_simpleitk_label_overlap(lpba_pair):
    f, m = lpba_pair
    ov = sitk.LabelOverlapMeasuresImageFilter()
    ov.Execute(_sitk(f, SPACING), _sitk(m, SPACING))
    ours = dice_per_label(f, m)
    assert sorted(ours) == sorted(int(v) for v in np.unique(f) if v)
    assert len(ours) > 30
    for lbl, d in ours.items():
        assert d == pytest.approx(ov.GetDiceCoefficient(lbl), abs=1e-12), lbl
    assert mean_dice(torch.from_numpy(f), torch.from_numpy(m)) == pytest.approx(
        np.mean(list(ours.values()))
    )


def test_dice_semantics_2d():
    f = np.zeros((6, 6), int)
    w = np.zeros((6, 6), int)
    f[:2, :2], w[1:3, :2] = 1, 1  # 2 + 2 overlapping voxels of 4 and 4
    f[4:, 4:] = 2  # only in the fixed map
    w[4:, :2] = 3  # only in the warped map
    d = dice_per_label(f, w, labels=[1, 2, 3, 9])
    assert d[1] == pytest.approx(0.5) and d[2] == 0.0 and d[3] == 0.0 and np.isnan(d[9])
    assert sorted(dice_per_label(f, w)) == [1, 2]  # default: nonzero labels of the fixed map
    assert mean_dice(f, w, labels=[1, 2, 9]) == pytest.approx(0.25)  # NaN ignored


# ---------------------------------------------------------------------------- surfaces
def test_surfel_tables_match_surface_distance_tables():
    """Our generated marching-squares/-cubes measures equal DeepMind's hand-made tables."""
    utils = pytest.importorskip("monai.metrics.utils")
    for sp in [(1.0, 1.0, 1.0), (0.7, 1.3, 2.9), (2.1, 0.4, 1.1), (1.0, 2.0), (0.5, 3.0)]:
        ref = utils.get_code_to_measure_table(sp)[0].double().numpy()
        np.testing.assert_allclose(_surfel_table(sp), ref, rtol=2e-6, atol=1e-7)


def _reference_hd(a: np.ndarray, b: np.ndarray, spacing, percents) -> list[float]:
    """surface-distance's definition rebuilt from other parts: its corner-code kernel and
    area table (MONAI's copies) with scipy's correlate, as surface-distance does, then
    nearest neighbours by k-d tree and area-weighted percentiles."""
    utils = pytest.importorskip("monai.metrics.utils")
    table, kernel = (
        np.asarray(t, dtype=np.float64) for t in utils.get_code_to_measure_table(spacing)
    )
    full = len(table) - 1

    def surface(mask):
        padded = np.pad(mask.astype(np.uint8), [(0, 1)] * mask.ndim)  # low side: cval=0
        code = ndimage.correlate(padded, kernel[0, 0].astype(np.uint8), mode="constant", cval=0)
        edge = (code != 0) & (code != full)
        return np.argwhere(edge) * spacing, table[code[edge]]

    (pa, wa), (pb, wb) = surface(a), surface(b)
    directed = []
    for p, q, w in ((pa, pb, wa), (pb, pa, wb)):
        d = cKDTree(q).query(p)[0]
        order = np.lexsort((w, d))
        cum = np.cumsum(w[order])
        k = np.searchsorted(cum / cum[-1], np.asarray(percents) / 100.0)
        directed.append(d[order][np.minimum(k, d.size - 1)])
    return list(np.maximum(*directed))


@pytest.mark.parametrize("ndim", [2, 3])
def test_hd_equals_surface_distance_definition(lpba_pair, ndim):
    f, m = lpba_pair
    sp = SPACING if ndim == 3 else (0.8, 1.7)
    if ndim == 2:
        f, m = f[:, :, 30], m[:, :, 30]
    ours95, ours100 = hd95(f, m, sp), hausdorff_distance(f, m, sp, percent=100)
    n = 0
    for lbl in ours95:
        a, b = f == lbl, m == lbl
        if not b.any():
            assert ours95[lbl] == np.inf
            continue
        ref95, ref100 = _reference_hd(a, b, np.array(sp), [95, 100])
        assert ours95[lbl] == pytest.approx(ref95, abs=1e-9), lbl
        assert ours100[lbl] == pytest.approx(ref100, abs=1e-9), lbl
        n += 1
    assert n >= (30 if ndim == 3 else 8)


def test_hd_matches_deepmind_surface_distance_if_installed(lpba_pair, monkeypatch):
    sd = pytest.importorskip("surface_distance")
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)  # numpy 2 removed the alias
    f, m = lpba_pair
    for lbl, h in hd95(f, m, SPACING).items():
        ref = sd.compute_robust_hausdorff(
            sd.compute_surface_distances(f == lbl, m == lbl, SPACING), 95
        )
        assert h == pytest.approx(ref, abs=1e-9) or (h == ref == np.inf)


def test_hd_against_simpleitk(lpba_pair):
    """HD100 vs HausdorffDistanceImageFilter; HD95 vs a signed-Maurer-distance-map percentile
    over LabelContour voxels (a different surface discretization: within a voxel)."""
    f, m = lpba_pair
    voxel = max(SPACING)
    ours95, ours100 = hd95(f, m, SPACING), hausdorff_distance(f, m, SPACING, percent=100)
    diffs95 = []
    for lbl in ours95:
        a, b = (f == lbl).astype(np.uint8), (m == lbl).astype(np.uint8)
        if not b.any():
            continue
        box = ndimage.find_objects(a | b)[0]  # crop with a margin (speed; same distances)
        box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box)
        a, b = a[box], b[box]
        ia, ib = _sitk(a, SPACING), _sitk(b, SPACING)
        hf = sitk.HausdorffDistanceImageFilter()
        hf.Execute(ia, ib)
        assert abs(ours100[lbl] - hf.GetHausdorffDistance()) <= voxel, lbl

        def dist_to(img):
            dm = sitk.SignedMaurerDistanceMap(
                img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
            )
            return np.abs(sitk.GetArrayFromImage(dm).T)

        ca = sitk.GetArrayFromImage(sitk.LabelContour(ia, fullyConnected=False)).T > 0
        cb = sitk.GetArrayFromImage(sitk.LabelContour(ib, fullyConnected=False)).T > 0
        ref95 = max(np.percentile(dist_to(ib)[ca], 95), np.percentile(dist_to(ia)[cb], 95))
        diffs95.append(ours95[lbl] - ref95)
    diffs95 = np.abs(diffs95)
    assert len(diffs95) > 30
    assert diffs95.max() <= voxel and diffs95.mean() <= voxel / 2


def test_hd_analytic_and_empty():
    x = np.indices((24, 24, 28))
    ball = (((x - 12) ** 2).sum(0) <= 36).astype(np.uint8)
    shifted = np.roll(ball, 2, axis=2)  # translated by 2 voxels along k
    for sp in [(1.0, 1.0, 1.0), (0.7, 2.0, 1.5)]:
        h100 = hausdorff_distance(ball, shifted, sp, percent=100)[1]
        assert h100 == pytest.approx(2 * sp[2])
        assert 0 < hd95(ball, shifted, sp)[1] <= h100
        assert hd95(ball, ball, sp)[1] == 0.0
    assert hausdorff_distance(
        ball[:, :, 12], np.roll(ball[:, :, 12], 3, 0), (1.5, 1.0), percent=100
    )[1] == pytest.approx(4.5)
    other = np.zeros_like(ball)
    other[:3, :3, :3] = 2
    h = hd95(ball + other, ball, (1, 1, 1), labels=[1, 2, 3])
    assert h[1] == 0.0 and h[2] == np.inf and np.isnan(h[3])


# ---------------------------------------------------------------------------- landmarks
def test_tre_analytic_translation():
    rng = np.random.default_rng(0)
    pf = rng.uniform(-50, 50, (20, 3))
    t = np.array([3.0, -4.0, 12.0])
    noise = rng.normal(0, 1, (20, 3))
    m = np.eye(4)
    m[:3, 3] = t
    errors, mean = tre(pf, pf + t + noise, AffineTransform(m))
    np.testing.assert_allclose(errors, np.linalg.norm(noise, axis=1), atol=1e-4)
    assert mean == pytest.approx(np.linalg.norm(noise, axis=1).mean(), abs=1e-4)
    errors0, mean0 = tre(torch.from_numpy(pf), pf + t, None)  # before registration
    np.testing.assert_allclose(errors0, 13.0)
    assert mean0 == pytest.approx(13.0)


# ---------------------------------------------------------------------------- Jacobians
def _det_numpy(u: np.ndarray) -> np.ndarray:
    """Independent reference: numpy central differences, det(I + ∇u)."""
    d = u.shape[0]
    grad = np.stack([np.stack(np.gradient(u[c], axis=tuple(range(d))), 0) for c in range(d)])
    j = np.moveaxis(grad, (0, 1), (-2, -1)) + np.eye(d)
    return np.linalg.det(j)


def _sdlogj_l2r(u: np.ndarray) -> float:
    """The Learn2Reg evaluation formula (scipy correlate, zero padding, [2:-2] crop, +3)."""
    d = u.shape[0]
    k = np.array([-0.5, 0.0, 0.5])
    grad = np.stack(
        [
            np.stack(
                [
                    ndimage.correlate(
                        u[c], k.reshape([3 if i == a else 1 for i in range(d)]), mode="constant"
                    )
                    for c in range(d)
                ]
            )
            for a in range(d)
        ]
    )  # (axis, component, *S)
    j = np.moveaxis(grad, (0, 1), (-2, -1)) + np.eye(d)
    det = np.linalg.det(j)[(slice(2, -2),) * d]
    return float(np.log(np.clip(det + 3, 1e-9, 1e9)).std())


def test_jacobian_affine_field():
    a = np.array([[1.1, 0.05, 0.0], [0.0, 0.9, 0.02], [0.01, 0.0, 1.2]])
    x = np.indices((12, 14, 10)).astype(np.float64)
    u = (
        np.einsum("ij,j...->i...", a - np.eye(3), x)
        + np.array([1.0, -2.0, 0.5])[:, None, None, None]
    )
    s = jacobian_stats(torch.from_numpy(u)[None])
    det = np.linalg.det(a)
    assert s["min"] == pytest.approx(det) and s["max"] == pytest.approx(det)
    assert s["mean"] == pytest.approx(det)
    assert s["sdlogj"] == pytest.approx(0.0, abs=1e-10) and s["sdlogj_l2r"] == pytest.approx(
        0.0, abs=1e-10
    )
    assert s["folding_count"] == 0 and s["folding_fraction"] == 0.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_fold_counted_on_raw_determinant(ndim):
    shape = (24,) * ndim
    x = np.indices(shape).astype(np.float64)
    c = np.array([11.7] * ndim).reshape(ndim, *([1] * ndim))
    r2 = ((x - c) ** 2).sum(0)
    rng = np.random.default_rng(1)
    u = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 4) for _ in range(ndim)])
    u[0] += -1.8 * (x[0] - c[0]) * np.exp(-r2 / (2 * 2.5**2))  # compresses past zero at c
    s = jacobian_stats(u)
    ref = _det_numpy(u)
    assert s["folding_count"] == int((ref <= 0).sum()) > 0
    assert s["folding_fraction"] == pytest.approx(s["folding_count"] / ref.size)
    assert np.isfinite(s["sdlogj"]) and s["sdlogj"] > 0.1
    assert s["sdlogj"] == pytest.approx(np.log(np.clip(ref, 1e-9, 1e9)).std(), rel=1e-9)
    assert s["sdlogj_l2r"] == pytest.approx(_sdlogj_l2r(u), rel=1e-9)
    assert s["min"] == pytest.approx(ref.min()) and s["min"] <= 0
    mask = r2 > 8**2  # away from the fold
    sm = jacobian_stats(u, mask=mask)
    assert sm["folding_count"] == 0
    assert sm["sdlogj"] == pytest.approx(np.log(ref[mask]).std(), rel=1e-9)


# ---------------------------------------------------------------------------- inverse consistency
def test_inverse_consistency():
    shape, sp = (16, 18, 12), (1.5, 1.0, 2.0)
    t = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1, 1)
    fwd = t.expand(1, 3, *shape).clone()
    assert inverse_consistency_error(fwd, -fwd, sp)["max"] < 1e-9
    bad = inverse_consistency_error(fwd, fwd, sp)  # not the inverse: error |2 t| in mm
    expected = 2 * np.linalg.norm(np.array([1.5, -2.0, 0.5]) * sp)
    assert bad["mean"] == pytest.approx(expected) and bad["max"] == pytest.approx(expected)
    # scaling about the centre, a = 0.9, and its exact inverse (linear fields: exact sampling)
    x = torch.from_numpy(np.indices(shape).astype(np.float64))[None]
    c = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)
    uf, ub = (0.9 - 1) * (x - c), (1 / 0.9 - 1) * (x - c)
    assert inverse_consistency_error(uf, ub, sp)["max"] < 1e-6
    assert inverse_consistency_error(uf, 0 * ub, sp)["mean"] > 0.1
