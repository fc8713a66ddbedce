"""Image reading/writing, checked against nibabel, SimpleITK and Pillow as references."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image as PILImage
from scipy.spatial.transform import Rotation

from learnreg.core import Grid, Image
from learnreg.core.errors import InputError
from learnreg.io import read_image, read_labels, write_image

F3 = np.diag([-1.0, -1.0, 1.0])


def _oblique_grid(shape, seed=0) -> Grid:
    rng = np.random.default_rng(seed)
    d = len(shape)
    if d == 3:
        rot = Rotation.from_euler("xyz", rng.uniform(-40, 40, 3), degrees=True).as_matrix()
        rot = rot @ np.diag([-1.0, 1.0, 1.0])  # a left-handed (LAS-like) index frame
    else:
        a = rng.uniform(-1, 1)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return Grid(shape, tuple(rng.uniform(0.5, 2.0, d)), tuple(rng.uniform(-80, 80, d)), rot)


def _sitk_world(img: sitk.Image, idx) -> np.ndarray:
    """World RAS position of a voxel according to SimpleITK (LPS flipped by hand)."""
    p = np.asarray(img.TransformContinuousIndexToPhysicalPoint(tuple(map(float, idx))))
    f = np.ones(len(p))
    f[:2] = -1
    return p * f


def _our_world(image: Image, idx) -> np.ndarray:
    return image.grid.index_to_world(torch.tensor([idx], dtype=torch.float64))[0].numpy()


# ---------------------------------------------------------------------------- NIfTI
def test_nifti_round_trip_oblique_3d(tmp_path):
    g = _oblique_grid((7, 9, 5))
    data = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 7, 9, 5)).astype(np.float32))
    path = write_image(Image(data, g), tmp_path / "a.nii.gz")
    back = read_image(path)
    assert back.data.dtype == torch.float32
    torch.testing.assert_close(back.data, data)
    assert back.grid.allclose(g, atol=1e-5)
    # the header as nibabel sees it: sform and qform both set from the grid
    nii = nib.load(str(path))
    assert nii.shape == (7, 9, 5)
    sform, scode = nii.get_sform(coded=True)
    qform, qcode = nii.get_qform(coded=True)
    assert scode in (1, 2) and qcode in (1, 2)
    np.testing.assert_allclose(sform, g.affine, atol=1e-5)
    np.testing.assert_allclose(qform, g.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(nii.dataobj), data[0].numpy())
    # SimpleITK puts the voxel at the same world position and reads the same value
    ref = sitk.ReadImage(str(path))
    np.testing.assert_allclose(_sitk_world(ref, (2, 3, 4)), _our_world(back, (2, 3, 4)), atol=1e-4)
    assert sitk.GetArrayFromImage(ref)[4, 3, 2] == pytest.approx(float(data[0, 2, 3, 4]))
    assert not [p for p in tmp_path.iterdir() if p.name != "a.nii.gz"], "temp files left"


def test_nifti_2d_round_trip_and_singleton_third_axis(tmp_path):
    g = _oblique_grid((6, 4))
    data = torch.arange(24, dtype=torch.float32).reshape(1, 6, 4)
    write_image(Image(data, g), tmp_path / "a.nii")
    assert nib.load(str(tmp_path / "a.nii")).shape == (6, 4)
    back = read_image(tmp_path / "a.nii")
    assert back.ndim == 2 and back.grid.allclose(g, atol=1e-5)
    torch.testing.assert_close(back.data, data)
    # (X, Y, 1) written by another tool is 2D too
    aff = np.diag([0.5, 0.7, 3.0, 1.0])
    aff[:3, 3] = [1, 2, 3]
    nib.save(nib.Nifti1Image(data[0, :, :, None].numpy(), aff), str(tmp_path / "b.nii.gz"))
    b = read_image(tmp_path / "b.nii.gz")
    assert b.data.shape == (1, 6, 4)
    assert b.grid.spacing == pytest.approx((0.5, 0.7))
    assert b.grid.origin == pytest.approx((1, 2))


def test_integer_labels_keep_dtype_and_reject_fractions(tmp_path):
    g = _oblique_grid((5, 6, 7), seed=2)
    lab = torch.randint(0, 200, (1, 5, 6, 7), dtype=torch.uint8)
    write_image(Image(lab, g), tmp_path / "lab.nii.gz")
    assert nib.load(str(tmp_path / "lab.nii.gz")).get_data_dtype() == np.uint8
    back = read_labels(tmp_path / "lab.nii.gz")
    assert back.data.dtype == torch.uint8
    assert torch.equal(back.data, lab)
    assert read_image(tmp_path / "lab.nii.gz").data.dtype == torch.float32
    # float-stored labels are accepted when integer-valued ...
    nib.save(
        nib.Nifti1Image(lab[0].numpy().astype(np.float64) + 1000, g.affine), str(tmp_path / "f.nii")
    )
    f = read_labels(tmp_path / "f.nii")
    assert f.data.dtype == torch.int16 and torch.equal(f.data, lab.to(torch.int16) + 1000)
    # ... and refused otherwise
    nib.save(
        nib.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)), str(tmp_path / "x.nii")
    )
    with pytest.raises(InputError, match=r"x\.nii.*non-integer"):
        read_labels(tmp_path / "x.nii")


def test_channels_written_and_read_on_last_axis(tmp_path):
    g = _oblique_grid((5, 6, 7), seed=3)
    data = torch.rand(3, 5, 6, 7)
    write_image(Image(data, g), tmp_path / "c.nii.gz")
    assert nib.load(str(tmp_path / "c.nii.gz")).shape == (5, 6, 7, 3)
    with pytest.raises(InputError, match=r"c\.nii\.gz: 4D image \(shape \(5, 6, 7, 3\)\)"):
        read_image(tmp_path / "c.nii.gz")
    back = read_image(tmp_path / "c.nii.gz", allow_channels=True)
    torch.testing.assert_close(back.data, data)


# ---------------------------------------------------------------------------- SimpleITK formats
@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".mhd"])
def test_sitk_formats_round_trip_oblique(tmp_path, ext):
    g = _oblique_grid((6, 7, 8), seed=4)
    data = torch.from_numpy(np.random.default_rng(5).normal(size=(1, 6, 7, 8)).astype(np.float32))
    write_image(Image(data, g), tmp_path / f"a{ext}")
    back = read_image(tmp_path / f"a{ext}")
    torch.testing.assert_close(back.data, data)
    assert back.grid.allclose(g, atol=1e-5)
    # what SimpleITK itself sees in our file: LPS geometry and a (k, j, i) array
    ref = sitk.ReadImage(str(tmp_path / f"a{ext}"))
    np.testing.assert_allclose(ref.GetOrigin(), F3 @ np.asarray(g.origin), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(ref.GetDirection()).reshape(3, 3), F3 @ np.asarray(g.direction), atol=1e-6
    )
    np.testing.assert_allclose(ref.GetSpacing(), g.spacing, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ref), data[0].numpy().T)
    if ext == ".mhd":
        assert (tmp_path / "a.raw").exists() or (tmp_path / "a.zraw").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left"


def test_reads_file_written_by_simpleitk(tmp_path):
    arr = np.random.default_rng(6).integers(0, 1000, size=(4, 5, 6)).astype(np.int16)  # (k, j, i)
    ref = sitk.GetImageFromArray(arr)
    ref.SetOrigin((10.0, -20.0, 30.0))
    ref.SetSpacing((0.5, 1.5, 2.5))
    rot = Rotation.from_euler("zyx", [30, 10, -20], degrees=True).as_matrix()
    ref.SetDirection(tuple(rot.ravel()))
    sitk.WriteImage(ref, str(tmp_path / "s.nrrd"))
    ours = read_image(tmp_path / "s.nrrd")
    assert ours.data.shape == (1, 6, 5, 4)
    np.testing.assert_array_equal(ours.data[0].numpy(), arr.T.astype(np.float32))
    for idx in [(0, 0, 0), (5, 4, 3), (1, 2, 3)]:
        np.testing.assert_allclose(_our_world(ours, idx), _sitk_world(ref, idx), atol=1e-5)
    assert read_labels(tmp_path / "s.nrrd").data.dtype == torch.int16


def test_png_round_trip_and_dtype_handling(tmp_path):
    g = Grid((9, 5))
    data = torch.randint(0, 256, (1, 9, 5)).float()
    write_image(Image(data, g), tmp_path / "a.png")  # integer-valued floats: lossless uint8
    pil = np.asarray(PILImage.open(tmp_path / "a.png"))
    assert pil.shape == (5, 9)  # rows = j, columns = i
    np.testing.assert_array_equal(pil.T, data[0].numpy())
    back = read_image(tmp_path / "a.png")
    torch.testing.assert_close(back.data, data)
    # non-integer floats are refused unless a conversion is asked for
    img = Image(torch.linspace(-0.5, 2.0, 45).reshape(1, 9, 5), g)
    with pytest.raises(InputError, match=r"b\.png.*dtype='uint8'"):
        write_image(img, tmp_path / "b.png")
    write_image(img, tmp_path / "b.png", dtype="uint8")  # round and clip
    clipped = np.asarray(PILImage.open(tmp_path / "b.png")).T
    np.testing.assert_array_equal(clipped, np.clip(np.round(img.data[0].numpy()), 0, 255))
    write_image(img, tmp_path / "c.png", rescale=True)
    stretched = np.asarray(PILImage.open(tmp_path / "c.png")).T.astype(float)
    assert stretched.min() == 0 and stretched.max() == 255
    expect = (img.data[0].numpy() + 0.5) / 2.5 * 255
    assert np.abs(stretched - expect).max() <= 0.51
    with pytest.raises(InputError, match=r"v\.png.*2D"):
        write_image(Image(torch.zeros(1, 3, 3, 3), Grid((3, 3, 3))), tmp_path / "v.png")


def test_rgb_png_becomes_luminance(tmp_path):
    rgb = np.random.default_rng(7).integers(0, 256, size=(6, 8, 3)).astype(np.uint8)
    PILImage.fromarray(rgb).save(tmp_path / "rgb.png")
    ours = read_image(tmp_path / "rgb.png")
    assert ours.data.shape == (1, 8, 6)
    ref = np.asarray(PILImage.fromarray(rgb).convert("L")).T.astype(np.float32)
    assert np.abs(ours.data[0].numpy() - ref).max() <= 1.0


def test_real_jpg_slice(data_root):
    path = data_root / "ants2d/r16slice.jpg"
    ours = read_image(path)
    assert ours.ndim == 2 and ours.data.shape == (1, 256, 256)
    np.testing.assert_array_equal(
        ours.data[0].numpy(), np.asarray(PILImage.open(path).convert("L")).T.astype(np.float32)
    )
    ref = sitk.ReadImage(str(path))
    np.testing.assert_allclose(_our_world(ours, (10, 200)), _sitk_world(ref, (10, 200)))


def _write_dicom_series(folder: Path, arr_kji: np.ndarray, spacing, origin, direction) -> None:
    """A DICOM series written with SimpleITK (after SimpleITK's DicomSeriesFromArray example)."""
    folder.mkdir()
    img = sitk.GetImageFromArray(arr_kji)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    now = time.strftime("%H%M%S"), time.strftime("%Y%m%d")
    d = direction
    tags = [
        ("0008|0031", now[0]),
        ("0008|0021", now[1]),
        ("0008|0008", "DERIVED\\SECONDARY"),
        ("0020|000d", "1.2.826.0.1.3680043.2.1125.1." + now[1] + now[0]),
        ("0020|000e", "1.2.826.0.1.3680043.2.1125.2." + now[1] + now[0]),
        ("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))),
        ("0008|103e", "learnreg test"),
        ("0008|0060", "MR"),
    ]
    for i in range(img.GetDepth()):
        s = img[:, :, i]
        for k, v in tags:
            s.SetMetaData(k, v)
        s.SetMetaData("0008|0012", now[1])
        s.SetMetaData("0008|0013", now[0])
        s.SetMetaData(
            "0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, i))))
        )
        s.SetMetaData("0020|0013", str(i))
        s.SetMetaData("0018|0050", str(spacing[2]))
        writer.SetFileName(str(folder / f"{i:03d}.dcm"))
        writer.Execute(s)


def test_dicom_series_folder(tmp_path):
    arr = np.random.default_rng(8).integers(0, 2000, size=(5, 12, 10)).astype(np.int16)
    rot = Rotation.from_euler("xyz", [15, -10, 5], degrees=True).as_matrix()
    spacing, origin = (0.8, 0.9, 2.5), (-20.0, 35.0, 12.0)
    _write_dicom_series(tmp_path / "series", arr, spacing, origin, tuple(rot.ravel()))
    ours = read_image(tmp_path / "series")
    assert ours.data.shape == (1, 10, 12, 5)
    np.testing.assert_array_equal(ours.data[0].numpy(), arr.T.astype(np.float32))
    np.testing.assert_allclose(ours.grid.spacing, spacing, atol=1e-4)
    np.testing.assert_allclose(ours.grid.origin, F3 @ np.asarray(origin), atol=1e-3)
    np.testing.assert_allclose(ours.grid.direction, F3 @ rot, atol=1e-4)
    # a single oblique slice keeps its 3D placement (an in-plane one would be 2D)
    one = read_image(tmp_path / "series" / "002.dcm")
    assert one.data.shape == (1, 10, 12, 1)
    np.testing.assert_array_equal(one.data[0, :, :, 0].numpy(), arr[2].T.astype(np.float32))
    np.testing.assert_allclose(_our_world(one, (3, 4, 0)), _our_world(ours, (3, 4, 2)), atol=1e-3)


# ---------------------------------------------------------------------------- real data
def test_real_lpba40_and_world_position_matches_simpleitk(lpba):
    path = lpba / "images/S01.nii.gz"
    ours = read_image(path)
    assert ours.data.shape == (1, 160, 192, 160) and ours.data.dtype == torch.float32
    assert 0.0 <= float(ours.data.min()) and float(ours.data.max()) <= 1.0
    ref = sitk.ReadImage(str(path))
    arr = sitk.GetArrayViewFromImage(ref)
    for idx in [(80, 96, 80), (12, 150, 33)]:
        np.testing.assert_allclose(_our_world(ours, idx), _sitk_world(ref, idx), atol=1e-4)
        assert float(ours.data[0][idx]) == pytest.approx(float(arr[idx[::-1]]))
    assert ours.grid.allclose(Grid.from_affine((160, 192, 160), nib.load(str(path)).affine))


def test_real_prostate_label_channels(data_root):
    path = data_root / "prostate_mr_trus/test/fixed_labels/case000025.nii.gz"
    with pytest.raises(InputError, match=r"case000025\.nii\.gz: 4D image"):
        read_image(path)
    lab = read_labels(path, allow_channels=True)
    assert lab.data.shape == (3, 44, 59, 41)
    assert not lab.data.is_floating_point()
    assert set(torch.unique(lab.data).tolist()) == {0, 1}
    ref = np.asarray(nib.load(str(path)).dataobj)
    np.testing.assert_array_equal(lab.data.numpy(), np.moveaxis(ref, -1, 0))
    assert lab.grid.spacing == pytest.approx((0.4, 0.4, 0.4))


# ---------------------------------------------------------------------------- errors
def test_read_errors_name_the_file(tmp_path):
    cases = {}
    cases["missing.nii.gz"] = "not found"
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    cases["empty.nii.gz"] = "empty"
    (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 30))
    cases["garbage.nii.gz"] = "cannot read"
    (tmp_path / "garbage.mha").write_bytes(b"this is not a metaimage\n" * 5)
    cases["garbage.mha"] = "cannot read"
    (tmp_path / "notes.xyz").write_text("hello")
    cases["notes.xyz"] = "unsupported image extension"
    nib.save(
        nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)),
        str(tmp_path / "four.nii.gz"),
    )
    cases["four.nii.gz"] = r"4D image \(shape \(4, 4, 4, 2\)\) not supported; expected 2D or 3D"
    nib.save(
        nib.Nifti1Image(np.zeros((0, 4, 4), np.float32), np.eye(4)), str(tmp_path / "zero.nii.gz")
    )
    cases["zero.nii.gz"] = "empty"
    nib.save(nib.Nifti1Image(np.zeros((5,), np.float32), np.eye(4)), str(tmp_path / "line.nii.gz"))
    cases["line.nii.gz"] = "1D image"
    sheared = np.eye(4)
    sheared[0, 1] = 0.7
    nib.save(
        nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), sheared), str(tmp_path / "shear.nii.gz")
    )
    cases["shear.nii.gz"] = "shear"
    (tmp_path / "nodicom").mkdir()
    cases["nodicom"] = "folder is empty"
    (tmp_path / "textdir").mkdir()
    (tmp_path / "textdir" / "a.txt").write_text("x")
    cases["textdir"] = "no DICOM series"
    # a truncated (but gzip-valid start) real NIfTI
    good = tmp_path / "good.nii.gz"
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20), np.float32), np.eye(4)),
        str(good),
    )
    (tmp_path / "cut.nii.gz").write_bytes(good.read_bytes()[:2000])
    cases["cut.nii.gz"] = "incomplete or corrupt"
    for name, pattern in cases.items():
        with pytest.raises(InputError, match=pattern) as err:
            read_image(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_write_errors_name_the_file(tmp_path):
    img = Image(torch.zeros(1, 3, 3, 3), Grid((3, 3, 3)))
    with pytest.raises(InputError, match=r"nowhere.*out\.nii\.gz.*does not exist"):
        write_image(img, tmp_path / "nowhere" / "out.nii.gz")
    with pytest.raises(InputError, match=r"out\.xyz.*unsupported"):
        write_image(img, tmp_path / "out.xyz")
    with pytest.raises(InputError, match=r"dir\.dcm"):
        write_image(img, tmp_path / "dir.dcm")
    # an unwritable folder (root ignores permission bits; use /sys then)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        target = locked / "out.nii.gz"
        if os.geteuid() == 0:
            target = Path("/sys/learnreg-test-out.nii.gz")
            if not Path("/sys").is_dir():
                pytest.skip("running as root without /sys: no unwritable folder")
        with pytest.raises(InputError, match=r"out\.nii\.gz: cannot write") as err:
            write_image(img, target)
        assert "\n" not in str(err.value)
        assert not target.exists()
    finally:
        locked.chmod(0o700)
