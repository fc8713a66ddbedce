"""DeTone's homography pairs on real images (scikit-image photos, ANTs brain slices)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learnreg.core.errors import InputError
from learnreg.data.datasets import collate_pairs
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.data.sources import source_kinds, synthetic_datasets
from learnreg.data.synthetic import (
    BRAIN_SLICES,
    PHOTOS,
    HomographyPairs,
    brain_slice_images,
    folder_images,
    homography_pairs,
    photo_images,
)
from learnreg.methods.homography import patch_corners

skimage = pytest.importorskip("skimage")
from skimage.transform import ProjectiveTransform  # noqa: E402
from skimage.transform import warp as sk_warp  # noqa: E402


@pytest.fixture(scope="module")
def photos() -> dict[str, torch.Tensor]:
    return photo_images("train", (240, 320))


def _xy(p: np.ndarray) -> np.ndarray:
    return p[:, ::-1].copy()  # index (row, col) → skimage's (x = col, y = row)


def _projective(src: np.ndarray, dst: np.ndarray) -> ProjectiveTransform:
    if hasattr(ProjectiveTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = ProjectiveTransform.from_estimate(src, dst)
    else:  # pragma: no cover - older scikit-image
        tform = ProjectiveTransform()
        tform = tform if tform.estimate(src, dst) else None
    assert tform
    return tform


def test_splits_are_disjoint_by_source_image(photos, data_root) -> None:
    held = photo_images("heldout", (240, 320))
    assert set(photos) == set(PHOTOS["train"]) and set(held) == set(PHOTOS["heldout"])
    assert not set(photos) & set(held)
    assert not set(BRAIN_SLICES["train"]) & set(BRAIN_SLICES["heldout"])
    for img in list(photos.values()) + list(held.values()):
        assert img.shape == (240, 320) and img.dtype == torch.float32
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.std()) > 0.02
    brains = brain_slice_images("all", (240, 320), folder=data_root / "ants2d")
    assert sorted(brains) == sorted(BRAIN_SLICES["train"] + BRAIN_SLICES["heldout"])
    assert all(0.9 < float(b.max()) <= 1.0 and float(b.min()) >= 0.0 for b in brains.values())


def test_items_collate_and_are_reproducible(photos) -> None:
    ds = HomographyPairs(photos, length=10, patch_size=64, rho=16, seed=3)
    item = ds[4]
    assert item["fixed"].shape == item["moving"].shape == (1, 64, 64)
    assert item["target"].shape == (4, 2) and item["target"].abs().max() <= 16
    assert item["names"][0] in photos and item["index"] == 4
    again = HomographyPairs(photos, length=10, patch_size=64, rho=16, seed=3)[4]
    for k in ("fixed", "moving", "target"):
        torch.testing.assert_close(item[k], again[k])
    other = HomographyPairs(photos, length=10, patch_size=64, rho=16, seed=4)[4]
    assert not torch.equal(item["target"], other["target"])
    batch = collate_pairs([ds[i] for i in range(3)])
    assert batch.fixed.shape == (3, 1, 64, 64) and batch.target.shape == (3, 4, 2)
    assert ds.grid.shape == (64, 64) and len(ds) == 10


def test_pair_matches_independent_projective_warp(photos) -> None:
    """fixed(x) = I(p + T(x)) with T(c) = c + δ, checked with skimage's ProjectiveTransform;
    moving is the plain crop at p; the target is δ."""
    ds = HomographyPairs(photos, length=5, patch_size=64, rho=16, seed=1)
    for index in (0, 3):
        k, origin, offsets = ds.draw(index)
        item = ds[index]
        img = ds.images[k].double().numpy()
        p = origin.numpy().astype(int)
        np.testing.assert_array_equal(
            item["moving"][0].numpy(), img[p[0] : p[0] + 64, p[1] : p[1] + 64]
        )
        torch.testing.assert_close(item["target"], offsets.float())
        c = patch_corners(64, torch.float64).numpy()
        tform = _projective(_xy(c), _xy(c + offsets.numpy() + p))
        ref = sk_warp(img, tform, output_shape=(64, 64), order=1, mode="constant")
        np.testing.assert_allclose(item["fixed"][0].numpy(), ref, atol=1e-4)


def test_pairs_with_context_are_the_grown_projective_warp(photos) -> None:
    """context=c: both items cover the patch grown by c; fixed(x) = I(p + T(x − c)) and moving
    the grown crop, checked with skimage; target and homography are on the grown grid."""
    c, size = 8, 64 + 16
    ds = HomographyPairs(photos, length=3, patch_size=64, rho=16, seed=4, context=c)
    k, origin, offsets = ds.draw(2)
    item = ds[2]
    assert item["fixed"].shape == item["moving"].shape == (1, size, size)
    img = ds.images[k].double().numpy()
    p = origin.numpy().astype(int)
    np.testing.assert_array_equal(
        item["moving"][0].numpy(), img[p[0] - c : p[0] - c + size, p[1] - c : p[1] - c + size]
    )
    corners = patch_corners(64, torch.float64).numpy()
    tform = _projective(_xy(corners + c), _xy(corners + offsets.numpy() + p))
    ref = sk_warp(img, tform, output_shape=(size, size), order=1, mode="constant")
    np.testing.assert_allclose(item["fixed"][0].numpy(), ref, atol=1e-4)
    grown = patch_corners(size, torch.float64).numpy()
    moved = tform(_xy(grown))[:, ::-1] - (p - c)  # grown corners in moving-item index
    np.testing.assert_allclose(item["target"].numpy(), moved - grown, atol=1e-3)
    with pytest.raises(ValueError, match="context"):
        HomographyPairs(photos, length=3, patch_size=64, downsample=2, context=3)


def test_downsampled_pairs_are_the_same_pairs(photos) -> None:
    full = HomographyPairs(photos, length=4, patch_size=64, rho=16, seed=2)
    half = HomographyPairs(photos, length=4, patch_size=64, rho=16, seed=2, downsample=2)
    a, b = full[1], half[1]
    assert b["fixed"].shape == (1, 32, 32)
    torch.testing.assert_close(b["fixed"], F.avg_pool2d(a["fixed"], 2))
    torch.testing.assert_close(b["moving"], F.avg_pool2d(a["moving"], 2))
    # coarse corner x ↔ full point 2x + ½; map it through the full-resolution homography
    h = a["homography"].double().numpy()
    c = patch_corners(32, torch.float64).numpy()
    q = np.c_[2 * c + 0.5, np.ones(4)] @ h.T
    mapped = (q[:, :2] / q[:, 2:] - 0.5) / 2
    np.testing.assert_allclose(b["target"].numpy(), mapped - c, atol=1e-4)


def test_brain_slices_and_mixed_sources(data_root, monkeypatch) -> None:
    monkeypatch.setenv("LEARNREG_DATA", str(data_root))
    ds = homography_pairs("brains", "heldout", length=3, patch_size=64, rho=16, downsample=2)
    assert ds.names == list(BRAIN_SLICES["heldout"])
    assert ds[0]["fixed"].shape == (1, 32, 32) and float(ds[0]["moving"].std()) > 0
    both = homography_pairs("both", "train", length=2, patch_size=128, rho=32)
    assert set(both.names) == set(PHOTOS["train"]) | set(BRAIN_SLICES["train"])


def test_bad_arguments_raise_value_error(photos) -> None:
    with pytest.raises(ValueError, match="smaller than"):
        HomographyPairs(photos, patch_size=200, rho=32)
    with pytest.raises(ValueError, match="divisor"):
        HomographyPairs(photos, patch_size=64, downsample=3)
    with pytest.raises(ValueError, match="2D"):
        HomographyPairs({"x": torch.rand(1, 240, 320)})
    with pytest.raises(ValueError, match="no images"):
        HomographyPairs({})
    with pytest.raises(ValueError, match="split"):
        photo_images("test")
    with pytest.raises(ValueError, match="source"):
        homography_pairs("faces")
    with pytest.raises(IndexError):
        HomographyPairs(photos, length=2, patch_size=64, rho=16)[2]


def test_homography_source_for_the_trainer(data_root) -> None:
    """``data.synthetic: {kind: homography}``: train and held-out pairs on the patch grid,
    the preprocessor that puts a new pair there, images normalized as at prediction."""
    assert {"homography", "warp"} <= set(source_kinds())
    pre = Preprocessor(NetworkGrid((32, 32), None, "RAS", 4), (1.0, 99.0))
    opts = {"kind": "homography", "patch_size": 64, "downsample": 2, "length": 5}
    train, val = synthetic_datasets({**opts, "val_length": 3}, pre)
    assert isinstance(train, HomographyPairs) and set(train.names) == set(PHOTOS["train"])
    assert set(val.names) == set(PHOTOS["heldout"]) and len(val) == 3 and len(train) == 5
    assert train.grid.shape == val.grid.shape == (32, 32) and train.rho == 16.0
    net = train.preprocessor.network
    assert net.shape == (32, 32) and net.levels == 0  # fixed size: no rounding up
    assert train.preprocessor.percentiles == (1.0, 99.0)
    item = train[0]
    assert item["fixed"].shape == (1, 32, 32) and item["target"].shape == (4, 2)
    assert float(item["moving"].max()) <= 1.0 and float(item["moving"].min()) >= 0.0
    assert not torch.equal(val[0]["target"], train[0]["target"])
    # an image folder (no held-out split unless val_images is given)
    folder = data_root / "ants2d"
    tr, va = synthetic_datasets({**opts, "images": str(folder), "image_size": [128, 128]}, pre)
    assert va is None and len(tr.names) == 6
    assert set(folder_images(folder, None, ["r16slice"])) == {"r16slice"}
    _, none = synthetic_datasets({**opts, "val_images": False}, pre)
    assert none is None
    with pytest.raises(
        InputError, match="unknown config key data.synthetic.patch_sise.*valid keys: kind"
    ):
        synthetic_datasets({**opts, "patch_sise": 3}, pre)
    with pytest.raises(InputError, match=r"network grid is \(32, 32\)"):
        synthetic_datasets({**opts, "downsample": 4}, pre)
    with pytest.raises(InputError, match="patch_size"):
        synthetic_datasets({"kind": "homography"}, Preprocessor(NetworkGrid()))
