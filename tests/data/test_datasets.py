"""Pair datasets on real LPBA40 at a reduced network resolution (40 x 48 x 40)."""

from __future__ import annotations

import pytest
import torch

from learnreg.core.errors import InputError
from learnreg.data.datasets import (
    PairDataset,
    atlas_pairs,
    collate_pairs,
    folder_subjects,
    pairs_from_csv,
    subject_pairs,
)
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.methods.base import RegistrationBatch

SHAPE = (40, 48, 40)


@pytest.fixture(scope="module")
def pre():
    return Preprocessor(NetworkGrid(shape=SHAPE, levels=3))


@pytest.fixture(scope="module")
def atlas_set(lpba, pre):
    subjects = folder_subjects(lpba / "images", lpba / "labels", ["S01", "S11", "S12.nii.gz"])
    return PairDataset(atlas_pairs(subjects["S01"], list(subjects.values())), pre)


def test_atlas_to_subject_from_folders(atlas_set):
    ds = atlas_set
    assert len(ds) == 2  # the atlas is not registered to itself
    assert ds.grid.shape == SHAPE and ds.has_labels
    item = ds[1]
    assert item["names"] == ("S01", "S12")
    assert item["fixed"].shape == (1, *SHAPE) and item["fixed"].dtype == torch.float32
    assert item["moving_labels"].dtype == torch.int64
    assert torch.equal(ds[0]["fixed"], item["fixed"])  # cached: the atlas is read once
    assert len(ds._cache) == 6
    batch = collate_pairs([ds[0], ds[1]])
    assert isinstance(batch, RegistrationBatch)
    assert batch.fixed.shape == (2, 1, *SHAPE) and batch.moving_labels.shape == (2, 1, *SHAPE)
    # labels line up with the image: labelled voxels are bright, background mostly dark
    img, lab = item["moving"][0], item["moving_labels"][0]
    assert img[lab > 0].mean() > 3 * img[lab == 0].mean()


def test_subject_pairs_and_csv(lpba, atlas_set, tmp_path):
    subjects = list(folder_subjects(lpba / "images", names=["S11", "S12", "S13"]).values())
    pairs = subject_pairs(subjects)
    assert len(pairs) == 6 and all(p.fixed != p.moving for p in pairs)
    csv = tmp_path / "pairs.csv"
    csv.write_text(
        "fixed,moving,fixed_labels,moving_labels\n"
        f"{lpba}/images/S01.nii.gz,{lpba}/images/S11.nii.gz,"
        f"{lpba}/labels/S01.nii.gz,{lpba}/labels/S11.nii.gz\n"
    )
    ds = PairDataset(pairs_from_csv(csv), atlas_set.preprocessor, grid=atlas_set.grid)
    assert torch.equal(ds[0]["moving"], atlas_set[0]["moving"])
    assert torch.equal(ds[0]["fixed_labels"], atlas_set[0]["fixed_labels"])
    nolab = tmp_path / "nolab.csv"
    nolab.write_text(f"fixed,moving\n{lpba}/images/S01.nii.gz,{lpba}/images/S11.nii.gz\n")
    ds2 = PairDataset(pairs_from_csv(nolab), atlas_set.preprocessor, atlas_set.grid, preload=False)
    assert not ds2.has_labels and collate_pairs([ds2[0]]).fixed_labels is None


def test_errors(lpba, tmp_path):
    with pytest.raises(InputError, match="no image for subjects"):
        folder_subjects(lpba / "images", names=["S99"])
    with pytest.raises(InputError, match="label map not found"):
        folder_subjects(lpba / "images", tmp_path, names=["S11"])
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nx,y\n")
    with pytest.raises(InputError, match="columns fixed, moving"):
        pairs_from_csv(bad)
