"""Grid geometry and physical-space resampling, checked against nibabel and SimpleITK."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from learnreg.core import Grid, Image
from learnreg.spatial import AffineTransform, resample

# ---------------------------------------------------------------------------- references
# Independent of learnreg: a SimpleITK image built from (origin, spacing, direction) in RAS,
# converted to LPS by hand (F = diag(-1, -1[, 1])) and with the (i, j, k) array transposed.


def _flip(d: int) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0][:d])


def sitk_image(arr: np.ndarray, origin, spacing, direction) -> sitk.Image:
    d = arr.ndim
    f = _flip(d)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    img.SetOrigin(tuple(map(float, f @ np.asarray(origin))))
    img.SetSpacing(tuple(map(float, spacing)))
    img.SetDirection(tuple(map(float, (f @ np.asarray(direction)).ravel())))
    return img


def sitk_affine(matrix_ras: np.ndarray) -> sitk.AffineTransform:
    d = matrix_ras.shape[0] - 1
    f = np.eye(d + 1)
    f[:d, :d] = _flip(d)
    m = f @ matrix_ras @ f
    tx = sitk.AffineTransform(d)
    tx.SetMatrix(tuple(map(float, m[:d, :d].ravel())))
    tx.SetTranslation(tuple(map(float, m[:d, d])))
    return tx


def random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    if d == 3:
        return Rotation.random(random_state=int(rng.integers(1 << 30))).as_matrix()
    a = rng.uniform(-np.pi, np.pi)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return r if rng.random() < 0.5 else r @ np.diag([1.0, -1.0])  # include reflections


def random_grid(shape, rng: np.random.Generator) -> Grid:
    d = len(shape)
    return Grid(
        tuple(shape),
        tuple(rng.uniform(0.6, 2.5, d)),
        tuple(rng.uniform(-50, 50, d)),
        tuple(map(tuple, random_rotation(d, rng))),
    )


def voxel_to_world_np(origin, spacing, direction, idx: np.ndarray) -> np.ndarray:
    return np.asarray(origin) + idx @ (np.asarray(direction) @ np.diag(spacing)).T


# ---------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("d", [2, 3])
def test_index_world_round_trip_matches_formula(d):
    rng = np.random.default_rng(d)
    g = random_grid((7, 9, 5)[:d], rng)
    idx = rng.uniform(-3, 10, size=(50, d))
    w = g.index_to_world(torch.from_numpy(idx)).numpy()
    np.testing.assert_allclose(
        w, voxel_to_world_np(g.origin, g.spacing, g.direction, idx), atol=1e-9
    )
    back = g.world_to_index(torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(back, idx, atol=1e-9)
    # SimpleITK (LPS) agrees after the flip
    ref = sitk_image(np.zeros(g.shape, np.float32), g.origin, g.spacing, g.direction)
    for p, q in zip(idx[:5], w[:5], strict=True):
        lps = np.asarray(ref.TransformContinuousIndexToPhysicalPoint(tuple(map(float, p))))
        np.testing.assert_allclose(_flip(d) @ lps, q, atol=1e-6)


def test_world_points_and_grid_sample_corners():
    rng = np.random.default_rng(3)
    g = random_grid((4, 6, 5), rng)
    pts = g.world_points(torch.float64)
    assert pts.shape == (4, 6, 5, 3)
    np.testing.assert_allclose(pts[0, 0, 0].numpy(), g.origin, atol=1e-9)
    np.testing.assert_allclose(
        pts[3, 5, 4].numpy(),
        voxel_to_world_np(g.origin, g.spacing, g.direction, np.array([3.0, 5, 4])),
        atol=1e-9,
    )
    gs = g.world_to_grid_sample(pts)
    # grid_sample order is (x, y, z) = reversed index order; corners are -1 / +1
    np.testing.assert_allclose(gs[0, 0, 0].numpy(), [-1, -1, -1], atol=1e-9)
    np.testing.assert_allclose(gs[3, 5, 4].numpy(), [1, 1, 1], atol=1e-9)
    np.testing.assert_allclose(gs[3, 0, 0].numpy(), [-1, -1, 1], atol=1e-9)


@pytest.mark.parametrize(
    "rel", ["lpba40/images/S01.nii.gz", "templates/mni.nii.gz", "templates/ch2.nii.gz"]
)
def test_from_nibabel_affine(data_root, rel):
    img = nib.load(str(data_root / rel))
    g = Grid.from_affine(img.shape[:3], img.affine)
    np.testing.assert_allclose(g.affine, img.affine, atol=1e-5)
    idx = np.array([[0, 0, 0], [10, 20, 30], [s - 1 for s in img.shape[:3]]], float)
    np.testing.assert_allclose(
        g.index_to_world(torch.from_numpy(idx)).numpy(),
        nib.affines.apply_affine(img.affine, idx),
        atol=1e-4,
    )
    # SimpleITK reads the same header as LPS
    ref = sitk.ReadImage(str(data_root / rel))
    np.testing.assert_allclose(_flip(3) @ np.asarray(ref.GetOrigin()), g.origin, atol=1e-4)
    np.testing.assert_allclose(
        _flip(3) @ np.asarray(ref.GetDirection()).reshape(3, 3), g.direction, atol=1e-5
    )
    np.testing.assert_allclose(ref.GetSpacing(), g.spacing, atol=1e-5)


def test_from_affine_rejects_shear():
    a = np.eye(4)
    a[0, 1] = 0.5
    with pytest.raises(ValueError, match="shear"):
        Grid.from_affine((4, 4, 4), a)


@pytest.mark.parametrize("d", [2, 3])
def test_resized_keeps_first_and_last_voxel_centres(d):
    rng = np.random.default_rng(10 + d)
    g = random_grid((11, 17, 9)[:d], rng)
    for shape in [(5, 33, 4)[:d], (22, 8, 9)[:d]]:
        r = g.resized(shape)
        assert r.shape == shape
        first = torch.zeros(1, d, dtype=torch.float64)
        np.testing.assert_allclose(
            r.index_to_world(first).numpy(), g.index_to_world(first).numpy(), atol=1e-9
        )
        last_r = torch.tensor([[s - 1.0 for s in shape]], dtype=torch.float64)
        last_g = torch.tensor([[s - 1.0 for s in g.shape]], dtype=torch.float64)
        np.testing.assert_allclose(
            r.index_to_world(last_r).numpy(), g.index_to_world(last_g).numpy(), atol=1e-9
        )
        np.testing.assert_allclose(r.direction, g.direction)


# ---------------------------------------------------------------------------- resampling
def _random_affine(d: int, rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """A random rotation (±15°) with anisotropic scale and shear, about ``centre``."""
    if d == 3:
        rot = Rotation.from_rotvec(rng.uniform(-0.26, 0.26, 3)).as_matrix()
    else:
        a = rng.uniform(-0.26, 0.26)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    lin = rot @ (np.diag(rng.uniform(0.9, 1.1, d)) + rng.uniform(-0.05, 0.05, (d, d)))
    m = np.eye(d + 1)
    m[:d, :d] = lin
    m[:d, d] = centre - lin @ centre + rng.uniform(-3, 3, d)
    return m


def _interior_mask(src: Grid, dst: Grid, matrix: np.ndarray | None) -> np.ndarray:
    """Voxels of ``dst`` whose sample point lies ≥ 1 voxel inside ``src`` (numpy only)."""
    d = dst.ndim
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in dst.shape], indexing="ij"), -1)
    w = voxel_to_world_np(dst.origin, dst.spacing, dst.direction, idx.reshape(-1, d))
    if matrix is not None:
        w = w @ matrix[:d, :d].T + matrix[:d, d]
    lin = np.asarray(src.direction) @ np.diag(src.spacing)
    si = np.linalg.solve(lin, (w - np.asarray(src.origin)).T).T
    inside = np.all((si >= 1) & (si <= np.asarray(src.shape) - 2), axis=1)
    return inside.reshape(dst.shape)


def _smooth_volume(shape, rng) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.normal(size=shape), 1.5).astype(np.float32) * 10 + 5


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_affine", [False, True])
def test_resample_matches_simpleitk_on_oblique_grids(d, seed, with_affine):
    rng = np.random.default_rng(100 * d + seed)
    src_shape = (24, 20, 22)[:d]
    src = random_grid(src_shape, rng)
    data = _smooth_volume(src_shape, rng)
    if d == 3:
        data[5:9, 6:12, 4:15] = 40.0  # sharp edges so nearest-neighbour differences show
    else:
        data[5:9, 6:12] = 40.0
    # destination: another random oblique grid centred on the source's centre
    centre = voxel_to_world_np(
        src.origin, src.spacing, src.direction, (np.asarray(src_shape) - 1) / 2
    )
    dst_shape = (18, 21, 16)[:d]
    rot = random_rotation(d, rng)
    sp = rng.uniform(0.7, 2.0, d)
    origin = centre - rot @ (sp * (np.asarray(dst_shape) - 1) / 2)
    dst = Grid(dst_shape, tuple(sp), tuple(origin), tuple(map(tuple, rot)))
    matrix = _random_affine(d, rng, centre) if with_affine else None
    transform = AffineTransform(torch.from_numpy(matrix)) if with_affine else None

    ref_src = sitk_image(data, src.origin, src.spacing, src.direction)
    ref_dst = sitk_image(np.zeros(dst_shape, np.float32), dst.origin, dst.spacing, dst.direction)
    tx = sitk_affine(matrix) if with_affine else sitk.Transform(d, sitk.sitkIdentity)
    mask = _interior_mask(src, dst, matrix)
    assert mask.mean() > 0.3, "test geometry should overlap"
    image = Image(torch.from_numpy(data)[None], src)
    for mode, interp in (("linear", sitk.sitkLinear), ("nearest", sitk.sitkNearestNeighbor)):
        ours = resample(image, dst, transform, mode=mode).data[0].double().numpy()
        ref = sitk.GetArrayFromImage(sitk.Resample(ref_src, ref_dst, tx, interp, 0.0)).T
        diff = np.abs(ours - ref)[mask]
        if mode == "linear":
            assert diff.max() < 1e-3 * np.ptp(data), diff.max()
        else:  # exact ties at half-voxel positions are measure-zero for random geometry
            assert (diff < 1e-5).mean() > 0.995


@pytest.fixture(scope="module")
def label_crop(lpba) -> tuple[np.ndarray, Grid]:
    img = nib.load(str(lpba / "labels/S01.nii.gz"))
    lab = np.asarray(img.dataobj[50:90, 70:110, 60:96])
    corner = nib.affines.apply_affine(img.affine, [50, 70, 60])
    g = Grid.from_affine(lab.shape, np.c_[img.affine[:, :3], np.r_[corner, 1]])
    return lab, g


def test_label_resampling_of_real_labels(label_crop):
    lab, g = label_crop
    assert len(np.unique(lab)) > 5
    rng = np.random.default_rng(7)
    centre = voxel_to_world_np(g.origin, g.spacing, g.direction, (np.asarray(lab.shape) - 1) / 2)
    matrix = _random_affine(3, rng, centre)
    dst = g.resized((30, 30, 27))  # a coarser grid on the same field of view
    image = Image(torch.from_numpy(lab)[None], g)
    t = AffineTransform(torch.from_numpy(matrix))
    out = resample(image, dst, t, mode="label").data[0].numpy()
    near = resample(image, dst, t, mode="nearest").data[0].numpy()
    assert out.dtype == lab.dtype
    assert set(np.unique(out)) <= set(np.unique(lab))
    ref = sitk.GetArrayFromImage(
        sitk.Resample(
            sitk_image(lab, g.origin, g.spacing, g.direction),
            sitk_image(np.zeros(dst.shape, np.uint8), dst.origin, dst.spacing, dst.direction),
            sitk_affine(matrix),
            sitk.sitkNearestNeighbor,
            0,
        )
    ).T
    mask = _interior_mask(g, dst, matrix)
    assert (near == ref)[mask].mean() > 0.995
    assert (out == ref)[mask].mean() > 0.9
    assert (out == near).mean() > 0.9


@pytest.mark.parametrize("d", [2, 3])
def test_world_points_of_every_voxel_match_simpleitk(d):
    rng = np.random.default_rng(10 + d)
    g = random_grid((5, 7, 4)[:d], rng)
    pts = g.world_points(torch.float64).reshape(-1, d).numpy()
    ref = sitk_image(np.zeros(g.shape, np.float32), g.origin, g.spacing, g.direction)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij"), -1)
    expected = [
        _flip(d) @ np.asarray(ref.TransformIndexToPhysicalPoint(tuple(map(int, i))))
        for i in idx.reshape(-1, d)
    ]
    np.testing.assert_allclose(pts, np.asarray(expected), atol=1e-6)
