"""``learnreg apply`` against damaged result folders, bad inputs and transform lists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.reliability.conftest import (
    assert_refused,
    assert_succeeded,
    cli,
    leftovers,
    snapshot,
)
from tests.reliability.faults import FAULTS


@pytest.fixture
def result(registered: Path, work: Path) -> Path:
    """A private copy of a registered result folder, to damage."""
    return Path(shutil.copytree(registered, work / "result"))


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


# ---------------------------------------------------------------------------- damaged results
@pytest.mark.parametrize("direction", [[], ["--inverse"], ["--labels"], ["--inverse", "--labels"]])
@pytest.mark.parametrize("damaged", ["warp.nii.gz", "inverse_warp.nii.gz"])
def test_truncated_field_is_refused_in_every_direction(inputs, work, result, direction, damaged):
    _truncate(result / damaged)
    image = inputs["moving_labels" if "--labels" in direction else "moving"]
    done = cli("apply", result, image, "-o", "out", *direction)
    assert_refused(done, damaged, "incomplete or corrupt")
    assert not (work / "out").exists() and leftovers(work) == []


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("no result.json", "result.json"),
        ("bad json", "result.json"),
        ("no affine", "affine.mat"),
        ("nan warp", "NaN"),
        ("not a folder", "result"),
        ("missing folder", "result"),
    ],
)
def test_damaged_result_folder_is_refused(inputs, work, result, damage, needle):
    if damage == "no result.json":
        (result / "result.json").unlink()
    elif damage == "bad json":
        (result / "result.json").write_text("{not json", encoding="utf-8")
    elif damage == "no affine":
        (result / "affine.mat").unlink()
    elif damage == "nan warp":
        img = nib.load(str(result / "warp.nii.gz"))
        data = np.asarray(img.dataobj).copy()
        data.flat[0] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine, img.header), str(result / "warp.nii.gz"))
    elif damage == "not a folder":
        shutil.rmtree(result)
        result.write_text("x")
    else:
        shutil.rmtree(result)
    done = cli("apply", result, inputs["moving"], "-o", "out")
    assert_refused(done, needle)
    assert not (work / "out").exists()


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "fault",
    [
        "missing",
        "truncated_gzip",
        "flipped_byte",
        "text_as_nifti",
        "four_d",
        "nan_translation",
        "huge_header",
        "markup_in_name",
    ],
)
def test_bad_input_image_is_refused(inputs, work, registered, fault):
    bad, problem = FAULTS[fault](inputs["moving"], work)
    done = cli("apply", registered, bad, "-o", "out")
    assert_refused(done, problem, bad.name)
    assert not (work / "out").exists() and leftovers(work) == []


def test_input_of_the_other_dimensionality(inputs, work, registered):
    done = cli("apply", registered, inputs["moving2d"], "-o", "out")
    assert_refused(done, "moving2d.nii.gz", "2D input for a 3D registration")


def test_intensity_image_given_as_labels(inputs, work, registered):
    img = nib.load(str(inputs["moving"]))
    data = np.asarray(img.dataobj, np.float32)
    noisy = np.round(data / data.max() * 3000 + np.random.default_rng(1).normal(0, 40, data.shape))
    path = work / "t1.nii.gz"
    nib.save(nib.Nifti1Image(noisy.astype(np.int16), img.affine), str(path))
    done = cli("apply", registered, path, "-o", "out", "--labels")
    assert_refused(done, "t1.nii.gz", "does not look like a label map")


def test_two_inputs_with_one_name(inputs, work, registered):
    (work / "a").mkdir()
    shutil.copy(inputs["moving"], work / "a" / "moving.nii.gz")
    done = cli("apply", registered, inputs["moving"], work / "a" / "moving.nii.gz", "-o", "out")
    assert_refused(done, "would both be written as moving.nii.gz")
    assert not (work / "out").exists()


@pytest.mark.parametrize(
    "table,needle",
    [
        ("x,y\n1,2\n", "2D points for a 3D registration"),
        ("x,y,z\n1,nan,3\n", "nan"),
        ("x,y,z\n", "no points"),
        ("a,b,c\n1,2,3\n", "x"),
        ("x,y,z\n1,two,3\n", "two"),
    ],
)
def test_bad_point_table(inputs, work, registered, table, needle):
    (work / "points.csv").write_text(table, encoding="utf-8")
    done = cli("apply", registered, work / "points.csv", "-o", "out")
    assert_refused(done, "points.csv", needle)
    assert not (work / "out").exists()


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--points-space", "RAI"], "--points-space"),
        (["--inverse", "-t", "affine.mat"], "--inverse applies to a result folder"),
        (["-r", "REF"], "--reference goes with -t"),
    ],
)
def test_bad_apply_flags(inputs, work, registered, flags, needle):
    flags = [str(registered / "affine.mat") if f == "affine.mat" else f for f in flags]
    flags = [str(inputs["fixed"]) if f == "REF" else f for f in flags]
    done = cli("apply", registered, inputs["moving"], "-o", "out", *flags)
    assert_refused(done, needle)


# ---------------------------------------------------------------------------- external transforms
@pytest.mark.parametrize(
    "kind,needle",
    [
        ("missing", "none.mat"),
        ("garbage", "garbage.mat"),
        ("truncated warp", "incomplete or corrupt"),
        ("image as warp", "not a displacement field"),
        ("no reference", "--reference"),
        ("missing reference", "noref.nii.gz"),
    ],
)
def test_bad_external_transform_list(inputs, work, registered, kind, needle):
    warp, affine = registered / "warp.nii.gz", registered / "affine.mat"
    ref = ["-r", inputs["fixed"]]
    if kind == "missing":
        ts = ["-t", work / "none.mat"]
    elif kind == "garbage":
        (work / "garbage.mat").write_bytes(b"\x00garbage")
        ts = ["-t", work / "garbage.mat"]
    elif kind == "truncated warp":
        cut = work / "cut_warp.nii.gz"
        cut.write_bytes(warp.read_bytes()[: warp.stat().st_size // 2])
        ts = ["-t", cut, "-t", affine]
    elif kind == "image as warp":
        ts = ["-t", inputs["moving"]]
    elif kind == "no reference":
        ts, ref = ["-t", warp, "-t", affine], []
    else:
        ts, ref = ["-t", warp, "-t", affine], ["-r", work / "noref.nii.gz"]
    done = cli("apply", inputs["moving"], *ts, *ref, "-o", "out")
    assert_refused(done, needle)
    assert not (work / "out").exists() and leftovers(work) == []


# ---------------------------------------------------------------------------- output folders
def test_apply_output_folder_is_one_runs(inputs, work, registered):
    assert_succeeded(cli("apply", registered, inputs["moving"], "-o", "out"))
    before = snapshot(work / "out")
    assert_refused(cli("apply", registered, inputs["moving_labels"], "-o", "out"), "not empty")
    assert snapshot(work / "out") == before
    done = cli("apply", registered, inputs["moving_labels"], "-o", "out", "--labels", "--overwrite")
    assert_succeeded(done)
    assert sorted(p.name for p in (work / "out").iterdir() if not p.name.startswith(".")) == [
        "moving_labels.nii.gz"
    ]


def test_apply_into_a_register_folder_is_refused(inputs, work, registered):
    before = snapshot(registered)
    assert_refused(cli("apply", registered, inputs["moving"], "-o", registered), "not empty")
    assert snapshot(registered) == before
    assert json.loads((registered / "result.json").read_text())
