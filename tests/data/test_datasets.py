"""The one pair type and CSV schema (training and evaluation), and pair datasets on real
LPBA40 at a reduced network resolution (40 x 48 x 40)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learnreg.core.errors import InputError
from learnreg.data.datasets import (
    Pair,
    PairDataset,
    Subject,
    atlas_folder_pairs,
    atlas_pairs,
    collate_pairs,
    folder_subjects,
    load_pair,
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


# ---------------------------------------------------------------------------- pairs CSV
def test_pairs_from_csv_resolves_relative_paths_and_names(tmp_path):
    (tmp_path / "sub").mkdir()
    csv = tmp_path / "sub/pairs.csv"
    csv.write_text(
        "fixed,moving,fixed_labels,moving_labels,name\n"
        "a.nii.gz,b.nii.gz,la.nii.gz,lb.nii.gz,\n"
        "/abs/a.nii.gz,c.nii.gz,,,custom name\n"
    )
    p1, p2 = pairs_from_csv(csv)
    assert p1.name == "b_to_a" and p1.fixed == tmp_path / "sub/a.nii.gz"
    assert p1.moving_labels == tmp_path / "sub/lb.nii.gz" and p1.fixed_points is None
    assert p2.fixed == Path("/abs/a.nii.gz") and p2.fixed_labels is None
    assert p2.name == "custom-name"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("fixed,labels\na,b\n", "unknown column(s) labels"),
        ("fixed,fixed_labels\na,b\n", "missing column(s) moving"),
        ("fixed,moving\n", "no pairs"),
        ("fixed,moving\na,b\n,c\n", "row 3: column 'fixed' is empty"),
        ("fixed,moving,fixed_labels,moving_labels\na,b,la,\n", "row 2: column 'fixed_labels'"),
        ("fixed,moving\na,b\na,b\n", "row 3: pair name 'b_to_a' repeats row 2"),
        ("fixed,moving\na,b,c\n", "row 2 has 3 fields"),
    ],
)
def test_pairs_from_csv_errors_name_row_and_column(tmp_path, text, needle):
    csv = tmp_path / "pairs.csv"
    csv.write_text(text)
    with pytest.raises(InputError, match="pairs.csv") as e:
        pairs_from_csv(csv)
    assert needle in str(e.value)
    with pytest.raises(InputError, match="not found"):
        pairs_from_csv(tmp_path / "nope.csv")


def test_atlas_folder_pairs(tmp_path):
    for d in ("img", "lab"):
        (tmp_path / d).mkdir()
    for s in ("S01", "S02", "S03"):
        (tmp_path / f"img/{s}.nii.gz").write_bytes(b"x")
    pairs = atlas_folder_pairs(tmp_path / "img/S01.nii.gz", tmp_path / "A.nii.gz",
                               tmp_path / "img", tmp_path / "lab")  # fmt: skip
    assert [p.name for p in pairs] == ["S02", "S03"]  # the atlas itself is left out
    assert pairs[0].moving_labels == tmp_path / "lab/S02.nii.gz"  # missing: an error when scored
    assert pairs[0].fixed_labels == tmp_path / "A.nii.gz"
    nolab = atlas_folder_pairs(tmp_path / "img/S01.nii.gz", None, tmp_path / "img")
    assert nolab[0].fixed_labels is None and not nolab[0].has_labels
    with pytest.raises(InputError, match="no images matching"):
        atlas_folder_pairs(tmp_path / "img/S01.nii.gz", None, tmp_path / "img", pattern="*.mha")
    with pytest.raises(InputError, match="atlas image not found"):
        atlas_folder_pairs(tmp_path / "x.nii.gz", None, tmp_path / "img")
    with pytest.raises(InputError, match="needs --atlas-labels"):
        atlas_folder_pairs(tmp_path / "img/S01.nii.gz", None, tmp_path / "img", tmp_path / "lab")


def test_one_pair_type_for_training_and_evaluation(lpba, atlas_set, tmp_path):
    """A CSV in the evaluation schema (landmarks, names) trains as well: one Pair type."""
    csv = tmp_path / "pairs.csv"
    csv.write_text(
        "name,fixed,moving,fixed_labels,moving_labels,fixed_points,moving_points\n"
        f"p1,{lpba}/images/S01.nii.gz,{lpba}/images/S11.nii.gz,{lpba}/labels/S01.nii.gz,"
        f"{lpba}/labels/S11.nii.gz,f.csv,m.csv\n"
    )
    (pair,) = pairs_from_csv(csv)
    assert pair.name == "p1" and pair.has_labels and pair.fixed_points == tmp_path / "f.csv"
    assert pair.fixed_subject == Subject(lpba / "images/S01.nii.gz", lpba / "labels/S01.nii.gz",
                                         tmp_path / "f.csv")  # fmt: skip
    assert Pair.from_dict(pair.to_dict()) == pair
    ds = PairDataset([pair], atlas_set.preprocessor, atlas_set.grid)
    assert ds.has_labels and ds[0]["names"] == ("S01", "S11")
    assert torch.equal(ds[0]["moving_labels"], atlas_set[0]["moving_labels"])
    # atlas and subject helpers make the same type, named as evaluation stores them
    a, b = Subject(Path("x/A.nii.gz")), Subject(Path("y/B.nii.gz"), Path("l/B.nii.gz"))
    assert atlas_pairs(a, [a, b]) == [Pair("B", a.image, b.image, moving_labels=b.labels)]
    assert [p.name for p in subject_pairs([a, b])] == ["B_to_A", "A_to_B"]
    assert Pair("n", "f.nii", "m.nii").fixed == Path("f.nii")  # strings become paths


def test_load_pair_reads_and_checks_files(lpba, tmp_path):
    pair = Pair("S11_to_S01", lpba / "images/S01.nii.gz", lpba / "images/S11.nii.gz",
                lpba / "labels/S01.nii.gz", lpba / "labels/S11.nii.gz")  # fmt: skip
    inp = load_pair(pair)
    assert inp.fixed.grid.allclose(inp.fixed_labels.grid, atol=1e-3)
    assert inp.moving_labels.data.dtype != torch.float32 and inp.fixed_points is None
    missing = Pair("x", pair.fixed, tmp_path / "nope.nii.gz")
    with pytest.raises(InputError, match=r"^pair x: moving .*nope.nii.gz: file not found"):
        load_pair(missing)
