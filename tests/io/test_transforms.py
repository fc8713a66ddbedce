"""ITK/ANTs transform files, checked against SimpleITK and (when installed) antspyx."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from learnreg.core import Grid, Image
from learnreg.core.errors import InputError
from learnreg.io import (
    read_affine,
    read_displacement,
    read_transform,
    read_transforms,
    to_sitk_transform,
    write_affine,
    write_displacement,
    write_image,
    write_transform,
)
from learnreg.spatial import AffineTransform, DisplacementField, TransformChain, resample


def _flip(d: int) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0][:d])


def sitk_map(tx: sitk.Transform, points_ras: np.ndarray) -> np.ndarray:
    """Map RAS points with a SimpleITK (LPS) transform, flipping by hand."""
    f = _flip(points_ras.shape[1])
    return np.array(
        [f @ np.asarray(tx.TransformPoint(tuple(map(float, f @ p)))) for p in points_ras]
    )


def ours_map(t, points_ras: np.ndarray) -> np.ndarray:
    return t(torch.from_numpy(points_ras)[None].float())[0].double().numpy()


def random_affine(d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.eye(d + 1)
    m[:d, :d] = np.eye(d) + rng.uniform(-0.2, 0.2, (d, d))
    m[:d, d] = rng.uniform(-20, 20, d)
    return m


# ---------------------------------------------------------------------------- affine files
@pytest.mark.parametrize("ext", [".mat", ".txt", ".tfm"])
@pytest.mark.parametrize("d", [2, 3])
def test_affine_round_trip_and_lps_convention(tmp_path, ext, d):
    m = random_affine(d, seed=d)
    path = write_affine(tmp_path / f"affine{ext}", AffineTransform(torch.from_numpy(m)))
    back = read_affine(path)
    np.testing.assert_allclose(back.homogeneous()[0].double().numpy(), m, atol=1e-5)
    # SimpleITK reading our file maps LPS points as F M F
    pts = np.random.default_rng(0).uniform(-50, 50, (6, d))
    ref = sitk_map(sitk.ReadTransform(str(path)), pts)
    np.testing.assert_allclose(ref, pts @ m[:d, :d].T + m[:d, d], atol=1e-4)
    inv = read_affine(path, invert=True)
    np.testing.assert_allclose(inv.homogeneous()[0].double().numpy(), np.linalg.inv(m), atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == [f"affine{ext}"]


@pytest.mark.parametrize(
    "make,ext",
    [
        (lambda: sitk.Euler3DTransform((10, -5, 3), 0.1, -0.3, 0.2, (4, 5, -6)), ".txt"),
        (lambda: sitk.Similarity3DTransform(1.1, (0, 0, 1), 0.3, (1, 2, 3), (5, 6, 7)), ".mat"),
        (lambda: sitk.Similarity2DTransform(0.9, 0.4, (3, -2), (10, 20)), ".tfm"),
        (
            lambda: sitk.ScaleSkewVersor3DTransform(
                (1.1, 0.9, 1.0), (0.05, 0, 0, 0.02, 0, 0), (0, 1, 0), 0.2, (1, 2, 3), (4, 5, 6)
            ),
            ".txt",
        ),
    ],
)
def test_reads_any_linear_itk_transform(tmp_path, make, ext):
    tx = make()
    path = tmp_path / f"t{ext}"
    sitk.WriteTransform(tx, str(path))
    ours = read_affine(path)
    pts = np.random.default_rng(1).uniform(-40, 40, (8, tx.GetDimension()))
    np.testing.assert_allclose(ours_map(ours, pts), sitk_map(tx, pts), atol=1e-3)


def test_reads_matrix_offset_transform_base_mat(tmp_path):
    """Old ANTs versions write ``MatrixOffsetTransformBase_double_3_3`` (centre = fixed)."""
    from scipy.io import savemat

    lin = np.eye(3) + np.random.default_rng(2).uniform(-0.1, 0.1, (3, 3))
    t, c = np.array([1.0, -2.0, 3.0]), np.array([10.0, 20.0, -5.0])
    params = np.r_[lin.ravel(), t][:, None]
    savemat(
        tmp_path / "old.mat",
        {"MatrixOffsetTransformBase_double_3_3": params, "fixed": c[:, None]},
        format="4",
    )
    ours = read_affine(tmp_path / "old.mat")
    pts_lps = np.random.default_rng(3).uniform(-30, 30, (5, 3))
    expect_lps = (pts_lps - c) @ lin.T + t + c  # ITK: M (x - c) + t + c
    f = _flip(3)
    np.testing.assert_allclose(ours_map(ours, pts_lps @ f) @ f, expect_lps, atol=1e-4)


def test_reads_affine_written_by_antspyx(tmp_path):
    ants = pytest.importorskip("ants")
    lin = np.eye(3) + np.random.default_rng(4).uniform(-0.1, 0.1, (3, 3))
    tx = ants.create_ants_transform(
        transform_type="AffineTransform",
        precision="float",
        dimension=3,
        matrix=lin,
        translation=(3.0, -4.0, 5.0),
        center=(10.0, 12.0, -8.0),
    )
    ants.write_transform(tx, str(tmp_path / "0GenericAffine.mat"))
    ours = read_affine(tmp_path / "0GenericAffine.mat")
    pts = np.random.default_rng(5).uniform(-30, 30, (5, 3))
    f = _flip(3)
    ref = np.array([f @ np.asarray(tx.apply_to_point(tuple(f @ p))) for p in pts])
    np.testing.assert_allclose(ours_map(ours, pts), ref, atol=1e-3)


# ---------------------------------------------------------------------------- fields
def _oblique_grid(shape, seed: int) -> Grid:
    rng = np.random.default_rng(seed)
    d = len(shape)
    if d == 3:
        rot = Rotation.from_euler("xyz", rng.uniform(-30, 30, 3), degrees=True).as_matrix()
    else:
        a = rng.uniform(-1, 1)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return Grid(shape, tuple(rng.uniform(0.8, 2.5, d)), tuple(rng.uniform(-40, 40, d)), rot)


def _smooth_field(shape, seed: int, amplitude: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = np.stack([gaussian_filter(rng.normal(size=shape), 4.0) for _ in shape])
    return u / np.abs(u).max() * amplitude


@pytest.mark.parametrize("d", [2, 3])
def test_displacement_round_trip_and_itk_layout(tmp_path, d):
    shape = (9, 11, 7)[:d]
    g = _oblique_grid(shape, seed=10 + d)
    u_ras = _smooth_field(shape, seed=d, amplitude=3.0)  # world mm, channels-first
    field = DisplacementField.from_world(g, torch.from_numpy(u_ras)[None].float())
    path = write_displacement(tmp_path / "warp.nii.gz", field)
    back = read_displacement(path)
    assert back.grid.allclose(g, atol=1e-5)
    np.testing.assert_allclose(back.world_field()[0].numpy(), u_ras, atol=1e-4)
    # the NIfTI as ANTs writes it: 5D (X, Y, Z, 1, D), vector intent, LPS vectors
    nii = nib.load(str(path))
    assert nii.shape == (*shape, *([1] * (3 - d)), 1, d)
    assert nii.header.get_intent()[0] == "vector"
    arr = np.asarray(nii.dataobj).reshape(*shape, d)
    np.testing.assert_allclose(
        np.moveaxis(arr, -1, 0), np.einsum("ab,b...->a...", _flip(d), u_ras), atol=1e-5
    )
    # SimpleITK's DisplacementFieldTransform maps voxel centres x to x + u(x)
    tx = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
    )
    idx = np.array([[2, 3, 4], [5, 1, 2], [8, 10, 6]])[:, :d]
    x = g.index_to_world(torch.from_numpy(idx).double()).numpy()
    u_at = np.stack([u_ras[(slice(None), *i)] for i in idx])
    np.testing.assert_allclose(sitk_map(tx, x), x + u_at, atol=1e-4)


# ---------------------------------------------------------------------------- interop scene
@pytest.fixture(scope="module")
def scene(lpba, tmp_path_factory):
    """A real LPBA40 crop on an oblique grid, an oblique fixed grid, an affine and a field,
    written with our writers."""
    img = nib.load(str(lpba / "images/S01.nii.gz"))
    crop = np.asarray(img.dataobj[30:126:2, 40:136:2, 30:126:2], dtype=np.float32)
    rot = Rotation.from_euler("xyz", [20, -15, 30], degrees=True).as_matrix()
    mg = Grid(crop.shape, (2.0, 2.2, 1.8), (10.0, -20.0, 5.0), rot)
    moving = Image(torch.from_numpy(crop)[None], mg, "moving")
    centre = mg.index_to_world(torch.tensor([[23.5, 23.5, 23.5]], dtype=torch.float64))[0].numpy()
    rot2 = Rotation.from_euler("xyz", [-10, 5, 12], degrees=True).as_matrix()
    fshape, fsp = (40, 44, 36), np.array([2.1, 1.9, 2.0])
    fg = Grid(fshape, tuple(fsp), tuple(centre - rot2 @ (fsp * (np.array(fshape) - 1) / 2)), rot2)
    a = np.eye(4)
    lin = Rotation.from_euler("xyz", [4, -3, 5], degrees=True).as_matrix() @ np.diag(
        [1.05, 0.97, 1.02]
    )
    a[:3, :3], a[:3, 3] = lin, centre - lin @ centre + np.array([2.0, -3.0, 1.5])
    affine = AffineTransform(torch.from_numpy(a))
    field = DisplacementField.from_world(
        fg, torch.from_numpy(_smooth_field(fshape, 0, 4.0))[None].float()
    )
    folder = tmp_path_factory.mktemp("scene")
    files = {
        "moving": write_image(moving, folder / "moving.nii.gz"),
        "fixed": write_image(Image(torch.zeros(1, *fshape), fg), folder / "fixed.nii.gz"),
        "affine": write_affine(folder / "affine.mat", affine),
        "warp": write_displacement(folder / "warp.nii.gz", field),
    }
    chain = TransformChain([field, affine])
    ours = resample(moving, fg, chain).data[0].numpy()
    # voxels whose sample point lies at least one voxel inside the moving grid
    idx = mg.world_to_index(chain(fg.world_points(torch.float64)[None].float()).double())[0]
    interior = ((idx >= 1) & (idx <= torch.tensor(mg.shape) - 2)).all(-1).numpy()
    return {
        "moving": moving,
        "grid": fg,
        "affine": affine,
        "field": field,
        "files": files,
        "ours": ours,
        "interior": interior,
    }


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference as a fraction of b's intensity range."""
    return float(np.abs(a - b).mean() / np.ptp(b))


def _sitk_resample(files: dict, transforms: list) -> np.ndarray:
    fixed = sitk.ReadImage(str(files["fixed"]))
    moving = sitk.ReadImage(str(files["moving"]), sitk.sitkFloat32)
    comp = sitk.CompositeTransform(3)
    for t in transforms:
        comp.AddTransform(t)
    out = sitk.Resample(moving, fixed, comp, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).T


def test_chain_files_replayed_by_simpleitk(scene):
    files, ours = scene["files"], scene["ours"]
    aff = sitk.ReadTransform(str(files["affine"]))
    warp = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(files["warp"])), sitk.sitkVectorFloat64)
    )
    # SimpleITK applies the last added first: add the affine, then the warp
    ref = _sitk_resample(files, [aff, warp])
    assert _mad(ref, ours) <= 0.01
    # away from the moving image's border (ITK clamps there, grid_sample fades) they agree
    # to float precision, and the other order is clearly different
    inside = scene["interior"]
    assert inside.mean() > 0.5
    assert _mad(ref[inside], ours[inside]) < 1e-4
    wrong = _sitk_resample(files, [warp, aff])
    assert _mad(wrong[inside], ours[inside]) > 0.005
    # to_sitk_transform builds the same composite
    fixed = sitk.ReadImage(str(files["fixed"]))
    moving = sitk.ReadImage(str(files["moving"]), sitk.sitkFloat32)
    chain = TransformChain([scene["field"], scene["affine"]])
    out = sitk.Resample(
        moving, fixed, to_sitk_transform(chain), sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    assert _mad(sitk.GetArrayFromImage(out).T, ours) <= 0.01
    # and reading the files back gives our chain
    again = resample(
        scene["moving"], scene["grid"], read_transforms([files["warp"], files["affine"]])
    )
    assert _mad(again.data[0].numpy(), ours) < 1e-4


def test_fixed_points_match_simpleitk_composite(scene):
    files, chain = scene["files"], TransformChain([scene["field"], scene["affine"]])
    g = scene["grid"]
    idx = np.random.default_rng(0).uniform(2, np.array(g.shape) - 3, (20, 3))
    pts = g.index_to_world(torch.from_numpy(idx)).numpy()
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(sitk.ReadTransform(str(files["affine"])))
    comp.AddTransform(
        sitk.DisplacementFieldTransform(
            sitk.Cast(sitk.ReadImage(str(files["warp"])), sitk.sitkVectorFloat64)
        )
    )
    expect = sitk_map(comp, pts)
    assert np.abs(expect - pts).max() > 2.0  # a real displacement
    np.testing.assert_allclose(ours_map(chain, pts), expect, atol=1e-3)
    np.testing.assert_allclose(sitk_map(to_sitk_transform(chain), pts), expect, atol=1e-4)


def test_chain_files_replayed_by_antspyx(scene):
    ants = pytest.importorskip("ants")
    files, ours = scene["files"], scene["ours"]
    fixed, moving = ants.image_read(str(files["fixed"])), ants.image_read(str(files["moving"]))
    warp, aff = str(files["warp"]), str(files["affine"])
    # transformlist in our chain order (first applied to fixed points first) reproduces our warp
    out = ants.apply_transforms(fixed, moving, transformlist=[warp, aff]).numpy()
    assert _mad(out, ours) <= 0.01
    # [affine, warp] is the chain [affine, field] only with whichtoinvert given explicitly ...
    m, g = scene["moving"], scene["grid"]
    ours_aw = resample(m, g, TransformChain([scene["affine"], scene["field"]])).data[0].numpy()
    out = ants.apply_transforms(fixed, moving, [aff, warp], whichtoinvert=[False, False]).numpy()
    assert _mad(out, ours_aw) <= 0.01
    # ... because antspyx defaults to inverting a leading .mat when given exactly two files
    inv_aw = (
        resample(m, g, TransformChain([scene["affine"].inverse(), scene["field"]])).data[0].numpy()
    )
    out = ants.apply_transforms(fixed, moving, [aff, warp]).numpy()
    assert _mad(out, inv_aw) <= 0.01 < _mad(out, ours_aw)
    # ANTs maps fixed points (LPS) with the same list, like our chain
    import pandas as pd

    idx = np.random.default_rng(1).uniform(2, np.array(g.shape) - 3, (10, 3))
    pts = g.index_to_world(torch.from_numpy(idx)).numpy()
    df = pd.DataFrame(pts @ _flip(3), columns=["x", "y", "z"])
    mapped = ants.apply_transforms_to_points(3, df, [warp, aff])[["x", "y", "z"]].to_numpy()
    chain = TransformChain([scene["field"], scene["affine"]])
    np.testing.assert_allclose(mapped @ _flip(3), ours_map(chain, pts), atol=1e-3)


def test_reads_ants_registration_outputs(lpba, tmp_path):
    """ANTs' own 0GenericAffine.mat / 1Warp.nii.gz / 1InverseWarp.nii.gz, read with our readers."""
    ants = pytest.importorskip("ants")
    from learnreg.io import read_image

    for s in ("S01", "S11"):
        im = ants.resample_image(
            ants.image_read(str(lpba / f"images/{s}.nii.gz")), (6, 6, 6), interp_type=0
        )
        ants.image_write(im, str(tmp_path / f"{s}.nii.gz"))
    fixed_a, moving_a = (ants.image_read(str(tmp_path / f"{s}.nii.gz")) for s in ("S01", "S11"))
    reg = ants.registration(
        fixed_a,
        moving_a,
        "SyN",
        reg_iterations=(20, 10),
        aff_iterations=(30, 10),
        aff_shrink_factors=(2, 1),
        aff_smoothing_sigmas=(1, 0),
        outprefix=str(tmp_path / "reg_"),
    )
    fwd, inv = reg["fwdtransforms"], reg["invtransforms"]
    assert [Path(p).name for p in fwd] == ["reg_1Warp.nii.gz", "reg_0GenericAffine.mat"]
    fixed, moving = read_image(tmp_path / "S01.nii.gz"), read_image(tmp_path / "S11.nii.gz")
    chain = read_transforms(fwd)
    assert isinstance(chain.transforms[0], DisplacementField)
    assert isinstance(chain.transforms[1], AffineTransform)
    warped = resample(moving, fixed.grid, chain).data[0].numpy()
    assert _mad(warped, reg["warpedmovout"].numpy()) <= 0.01
    # inverse: [0GenericAffine.mat inverted, 1InverseWarp.nii.gz] maps moving to fixed
    back = read_transforms([(inv[0], True), inv[1]])
    warped_fixed = resample(fixed, moving.grid, back).data[0].numpy()
    assert _mad(warped_fixed, reg["warpedfixout"].numpy()) <= 0.01
    pts = fixed.grid.world_points(torch.float64)[8:20:3, 10:22:3, 8:20:3].reshape(1, -1, 3).float()
    moved = chain(pts)
    assert (moved - pts).norm(dim=-1).mean() > 2.0
    assert (back(moved) - pts).norm(dim=-1).mean() < 0.3


# ---------------------------------------------------------------------------- dispatch, .h5
def test_read_transform_dispatch_and_h5_composite(tmp_path, scene):
    files = scene["files"]
    assert isinstance(read_transform(files["affine"]), AffineTransform)
    assert isinstance(read_transform(files["warp"]), DisplacementField)
    chain = TransformChain([scene["field"], scene["affine"]])
    h5 = write_transform(tmp_path / "composite.h5", chain)
    g = scene["grid"]
    idx = np.random.default_rng(2).uniform(2, np.array(g.shape) - 3, (10, 3))
    pts = g.index_to_world(torch.from_numpy(idx)).numpy()
    np.testing.assert_allclose(
        sitk_map(sitk.ReadTransform(str(h5)), pts), ours_map(chain, pts), atol=1e-3
    )
    back = read_transform(h5)
    assert isinstance(back, TransformChain) and len(back.transforms) == 2
    assert isinstance(back.transforms[0], DisplacementField)
    np.testing.assert_allclose(ours_map(back, pts), ours_map(chain, pts), atol=1e-3)
    inv = read_transform(files["affine"], invert=True)
    np.testing.assert_allclose(ours_map(inv, ours_map(scene["affine"], pts)), pts, atol=1e-3)


def test_transform_errors_name_the_file(tmp_path):
    cases = {}
    cases["missing.mat"] = (read_affine, "not found")
    (tmp_path / "junk.mat").write_bytes(b"\x00\x01garbage" * 10)
    cases["junk.mat"] = (read_affine, "cannot read")
    (tmp_path / "junk.txt").write_text("#Insight Transform File V1.0\nTransform: Nope_double_3_3\n")
    cases["junk.txt"] = (read_transform, "cannot read")
    (tmp_path / "a.json").write_text("{}")
    cases["a.json"] = (read_transform, "unsupported transform extension")
    nib.save(
        nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "scalar.nii.gz")
    )
    cases["scalar.nii.gz"] = (read_displacement, "not a displacement field")
    nib.save(
        nib.Nifti1Image(np.zeros((4, 4, 4, 1, 2), np.float32), np.eye(4)),
        str(tmp_path / "two.nii.gz"),
    )
    cases["two.nii.gz"] = (read_displacement, "displacement field")
    for name, (fn, pattern) in cases.items():
        with pytest.raises(InputError, match=pattern) as err:
            fn(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value), str(err.value)
    affine = AffineTransform(torch.eye(4))
    with pytest.raises(InputError, match=r"nowhere.*a\.mat"):
        write_affine(tmp_path / "nowhere" / "a.mat", affine)
    with pytest.raises(InputError, match=r"a\.nii\.gz"):
        write_affine(tmp_path / "a.nii.gz", affine)
    with pytest.raises(InputError, match=r"b\.txt.*not affine"):
        write_transform(tmp_path / "b.txt", DisplacementField.zeros(Grid((3, 3, 3))))
