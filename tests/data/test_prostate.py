"""MR–TRUS prostate pairs: case listing, masks, physical-space resampling, augmentation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.data.prostate import (
    MaskAugmenter,
    ProstatePairs,
    mask_centroids,
    prostate_cases,
    read_masks,
    resample_masks,
    warp_masks,
)

CASES = ["case000000", "case000002"]  # three mask channels; one (gland only)


@pytest.fixture(scope="module")
def prostate(data_root: Path) -> Path:
    return data_root / "prostate_mr_trus"


@pytest.fixture(scope="module")
def pairs(prostate: Path) -> ProstatePairs:
    torch.set_num_threads(1)
    return ProstatePairs(prostate, "train", names=CASES, spacing=1.6, levels=2)


def test_cases_listing(prostate: Path) -> None:
    train, test = prostate_cases(prostate, "train"), prostate_cases(prostate, "test")
    assert len(train) == 25 and [c.name for c in test] == ["case000025", "case000026"]
    c = test[0]
    assert (
        c.fixed_image.parent.name == "fixed_images" and c.moving_labels.name == c.fixed_image.name
    )
    with pytest.raises(ValueError, match="unknown cases"):
        prostate_cases(prostate, "test", ["case999"])
    with pytest.raises(ValueError, match="not found"):
        prostate_cases(prostate, "validation")


def test_read_masks(prostate: Path, tmp_path: Path) -> None:
    m = read_masks(prostate / "test" / "fixed_labels" / "case000025.nii.gz")
    assert m.data.shape == (3, 44, 59, 41) and m.data.dtype == torch.float32
    assert set(torch.unique(m.data).tolist()) == {0.0, 1.0}
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4, 2), 2, np.uint8), np.eye(4)), bad)
    with pytest.raises(ValueError, match="binary masks"):
        read_masks(bad)


def test_items_on_network_grid(pairs: ProstatePairs) -> None:
    g = pairs.grid
    assert g.shape == (12, 16, 12) and g.spacing == (1.6, 1.6, 1.6)
    item = pairs[1]  # case000002: gland only, padded to three channels
    assert item["fixed"].shape == item["moving"].shape == (1, *g.shape)
    assert 0 <= float(item["moving"].min()) and float(item["moving"].max()) <= 1
    assert item["fixed_labels"].shape == (3, *g.shape)
    vol = item["fixed_labels"].flatten(1).sum(1)
    assert vol[0] > 0 and vol[1:].abs().sum() == 0
    with pytest.raises(IndexError):
        pairs[2]
    # a new fixed image gets a network grid of the same shape and spacing (fixed-size
    # networks), centred on its own field of view
    other = pairs.originals(1)["fixed"]
    new = pairs.preprocessor.grid_for(other)
    assert new.shape == g.shape and new.spacing == g.spacing
    assert np.allclose(new.center, other.grid.center, atol=1e-6)


def test_resampling_keeps_physical_position_and_volume(pairs: ProstatePairs) -> None:
    """Masks moved onto the coarser network grid keep their world centroid and volume."""
    o = pairs.originals(0)
    for role in ("fixed", "moving"):
        native = o[f"{role}_labels"]
        on_net = Image(pairs[0][f"{role}_labels"], pairs.grid)
        c0, c1 = mask_centroids(native), mask_centroids(on_net)
        assert torch.allclose(c0[0], c1[0], atol=0.3)  # gland centroid, mm
        v0 = float(native.data[0].sum()) * float(np.prod(native.grid.spacing))
        v1 = float(on_net.data[0].sum()) * float(np.prod(pairs.grid.spacing))
        assert abs(v1 / v0 - 1) < 0.05
    # MR and TRUS masks differ in world space: the pair is not aligned before registration
    gap = (mask_centroids(o["fixed_labels"])[0] - mask_centroids(o["moving_labels"])[0]).norm()
    assert gap > 1.0


def test_warp_masks_identity_and_shift() -> None:
    for d in (2, 3):
        grid = Grid((12,) * d, (0.5,) * d)
        data = torch.zeros(1, *(12,) * d)
        data[(0, *([slice(4, 8)] * d))] = 1
        masks = Image(data, grid)
        assert torch.equal(warp_masks(masks, grid, None), data.to(torch.uint8))
        shift = torch.zeros(d)
        shift[0] = 1.0  # one mm = two voxels

        def move(p: torch.Tensor, s: torch.Tensor = shift) -> torch.Tensor:
            return p + s

        out = warp_masks(masks, grid, move)
        c_in, c_out = mask_centroids(masks), mask_centroids(out.float(), grid)
        assert torch.allclose(c_out - c_in, -shift.double().unsqueeze(0), atol=1e-6)


def test_mask_centroids_errors_and_empty() -> None:
    grid = Grid((5, 6))
    m = torch.zeros(2, 5, 6)
    m[0, 1, 2] = 1
    c = mask_centroids(m, grid)
    assert c[0].tolist() == [1.0, 2.0] and torch.isnan(c[1]).all()
    with pytest.raises(ValueError, match="needs its grid"):
        mask_centroids(m)
    with pytest.raises(ValueError, match="do not match"):
        mask_centroids(m[:, :4], grid)


def test_resample_masks_outside_is_empty() -> None:
    grid = Grid((8, 8, 8))
    masks = Image(torch.ones(2, 8, 8, 8), grid)
    far = Grid((4, 4, 4), origin=(100.0, 0.0, 0.0))
    assert resample_masks(masks, far).data.abs().sum() == 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_mask_augmenter_keeps_image_and_masks_aligned(ndim: int) -> None:
    g = torch.Generator().manual_seed(0)
    shape = (16,) * ndim
    img = torch.rand(1, *shape, generator=g)
    item = {"fixed": img, "moving": img.clone(), "fixed_labels": img.repeat(2, *([1] * ndim))}
    aug = MaskAugmenter(rotation=10, scale=0.1, translation=2)
    out = aug(item, torch.Generator().manual_seed(1))
    assert not torch.allclose(out["fixed"], img)
    assert torch.allclose(out["fixed_labels"][0], out["fixed"][0], atol=1e-6)
    assert not torch.allclose(out["moving"], out["fixed"])  # independent transforms
    again = aug(item, torch.Generator().manual_seed(1))
    assert torch.equal(again["moving"], out["moving"])  # reproducible
    with pytest.raises(ValueError, match="float masks"):
        aug({**item, "fixed_labels": item["fixed_labels"].long()}, torch.Generator())
