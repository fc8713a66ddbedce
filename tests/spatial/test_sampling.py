from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import map_coordinates

from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.spatial import AffineTransform, Rigid, resample, sample, sample_index, warp

DT = torch.float64


@pytest.fixture(scope="module")
def slice2d(data_root: Path) -> np.ndarray:
    """A real 256×256 brain slice in [0, 1], downsampled to 64×64 for speed."""
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(data_root / "ants2d" / "r16slice.jpg")))
    arr = arr.astype(np.float64)
    if arr.ndim == 3:  # colour JPG
        arr = arr.mean(-1)
    return arr.T[::4, ::4] / 255.0  # SimpleITK (j, i) -> index order (i, j)


def test_gradcheck_sample_and_warp() -> None:
    img = torch.rand(1, 2, 5, 6, dtype=DT, requires_grad=True)
    coords = (torch.rand(1, 3, 4, 2, dtype=DT) * 2.2 - 1.1).requires_grad_()
    for padding in ("zeros", "border"):
        assert torch.autograd.gradcheck(
            lambda i, c, p=padding: sample(i, c, padding=p), (img, coords)
        )
    img3 = torch.rand(1, 1, 4, 3, 5, dtype=DT, requires_grad=True)
    u = (torch.randn(1, 3, 4, 3, 5, dtype=DT) * 0.8).requires_grad_()
    assert torch.autograd.gradcheck(warp, (img3, u))


def test_warp_integer_translation_is_a_shift(slice2d: np.ndarray) -> None:
    img = torch.tensor(slice2d)[None, None]
    u = torch.zeros(1, 2, *slice2d.shape, dtype=DT)
    u[:, 0], u[:, 1] = 3.0, -2.0  # out(i, j) = img(i + 3, j - 2)
    out = warp(img, u)[0, 0].numpy()
    np.testing.assert_allclose(out[:-3, 2:], slice2d[3:, :-2], atol=1e-12)
    assert np.all(out[-3:] == 0)  # zeros padding outside
    vol = torch.rand(1, 1, 6, 7, 8, dtype=DT)
    v = torch.tensor([-1.0, 2.0, 1.0], dtype=DT).view(1, 3, 1, 1, 1).expand(1, 3, 6, 7, 8)
    np.testing.assert_allclose(
        warp(vol, v)[0, 0, 1:, :-2, :-1].numpy(), vol[0, 0, :-1, 2:, 1:].numpy(), atol=1e-12
    )


def test_sample_index_and_labels() -> None:
    img = torch.arange(30, dtype=DT).view(1, 1, 5, 6)  # value = 6 i + j
    pts = torch.tensor([[[1.5, 2.25], [0.0, 5.0]]], dtype=DT).unsqueeze(2)  # (1, 2, 1, 2)
    np.testing.assert_allclose(sample_index(img, pts)[0, 0, :, 0].numpy(), [11.25, 5.0])
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    labels[0, 0, 2:5, 3:6] = 7
    shifted = warp(labels, torch.ones(1, 2, 8, 8), mode="label")
    assert shifted.dtype == torch.uint8
    np.testing.assert_array_equal(shifted[0, 0, 1:4, 2:5].numpy(), 7)
    assert int((shifted == 7).sum()) == 9


def test_resample_matches_map_coordinates_2d(slice2d: np.ndarray) -> None:
    """Physical-space resampling through a rigid transform vs scipy on index coordinates."""
    rot = np.array([[np.cos(0.2), -np.sin(0.2)], [np.sin(0.2), np.cos(0.2)]])
    moving = Image(
        torch.tensor(slice2d)[None].float(), Grid(slice2d.shape, (3.0, 3.5), (-90, -110), rot)
    )
    fixed = Grid((50, 56), spacing=(3.3, 3.1), origin=(-80.0, -95.0))
    t = Rigid.from_params(torch.tensor([[0.15, 4.0, -6.0]]), center=[0.0, 0.0])
    out = resample(moving, fixed, t).data[0].numpy()
    # independent reference: index -> world -> transform -> moving index, all in numpy
    m = np.linalg.inv(moving.grid.affine) @ t.homogeneous()[0].double().numpy() @ fixed.affine
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in fixed.shape], indexing="ij"), 0)
    src = np.einsum("ij,j...->i...", m[:2, :2], idx) + m[:2, 2].reshape(2, 1, 1)
    ref = map_coordinates(slice2d, src, order=1, mode="constant", cval=0.0)
    inside = np.all((src > 0) & (src < np.reshape(slice2d.shape, (2, 1, 1)) - 1), axis=0)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(out[inside], ref[inside], atol=1e-4)


def test_resample_matches_map_coordinates_3d() -> None:
    rng = np.random.default_rng(0)
    vol = rng.random((10, 12, 9))
    q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    q *= np.sign(np.linalg.det(q))
    moving = Image(torch.tensor(vol)[None].float(), Grid(vol.shape, (1.5, 1.0, 2.0), (-5, 3, 1), q))
    fixed = Grid((8, 9, 7), spacing=(1.2, 1.4, 2.2), origin=(-4.0, 4.0, 2.0), direction=q)
    a = np.eye(3) + rng.normal(0, 0.05, (3, 3))
    t = AffineTransform(np.c_[a, rng.normal(0, 1, 3)])
    out = resample(moving, fixed, t).data[0].numpy()
    m = np.linalg.inv(moving.grid.affine) @ t.homogeneous()[0].double().numpy() @ fixed.affine
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in fixed.shape], indexing="ij"), 0)
    src = np.einsum("ij,j...->i...", m[:3, :3], idx) + m[:3, 3].reshape(3, 1, 1, 1)
    ref = map_coordinates(vol, src, order=1, mode="constant", cval=0.0)
    inside = np.all((src > 0) & (src < np.reshape(vol.shape, (3, 1, 1, 1)) - 1), axis=0)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(out[inside], ref[inside], atol=1e-4)
