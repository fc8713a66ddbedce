"""``learnreg register`` against bad inputs, bad flags and output folders in every state."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from learnreg.core.run_folder import MARKER
from tests.reliability.conftest import (
    assert_refused,
    assert_succeeded,
    cli,
    fast_register,
    leftovers,
    snapshot,
)
from tests.reliability.faults import FAULTS


# ---------------------------------------------------------------------------- image faults
@pytest.mark.parametrize("role", ["fixed", "moving"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_bad_image_is_refused_before_anything_is_written(inputs, work, role, fault):
    bad, problem = FAULTS[fault](inputs[role], work)
    done = fast_register(inputs, **{role: bad})
    assert_refused(done, problem, bad.name)
    assert not (work / "out").exists() and leftovers(work) == []


def test_dimensionality_mismatch(inputs, work):
    done = fast_register(inputs, moving=inputs["moving2d"])
    assert_refused(done, "moving2d.nii.gz", "2D", "3D")
    assert not (work / "out").exists()


def test_moving_far_smaller_field_of_view_warns(inputs, work):
    img = nib.load(str(inputs["moving"]))
    data = np.asarray(img.dataobj, np.float32)
    cx, cy, cz = (s // 2 for s in data.shape)
    crop = data[cx - 2 : cx + 2, cy - 2 : cy + 2, cz - 2 : cz + 2]  # 4³ of 20×24×20
    aff = img.affine.copy()
    aff[:3, 3] = aff[:3, :3] @ [cx - 2, cy - 2, cz - 2] + aff[:3, 3]
    small = work / "small.nii.gz"
    nib.save(nib.Nifti1Image(crop, aff), str(small))
    done = fast_register(inputs, moving=small)
    assert_succeeded(done)
    assert "barely overlap" in done.stderr
    metrics = json.loads((work / "out" / "result.json").read_text())
    assert any("barely overlap" in w for w in metrics["info"]["warnings"])


def test_header_without_orientation_is_read_as_itk_reads_it(inputs, work):
    import SimpleITK as sitk

    from learnreg.io.images import read_image

    img = nib.load(str(inputs["moving"]))
    bare = nib.Nifti1Image(np.asarray(img.dataobj, np.float32), None)
    bare.header.set_zooms((8.0, 8.0, 8.0))
    bare.header.set_qform(None, code=0)
    bare.header.set_sform(None, code=0)
    path = work / "bare.nii.gz"
    nib.save(bare, str(path))
    assert int(nib.load(str(path)).header["qform_code"]) == 0
    ours = read_image(path)
    ref = sitk.ReadImage(str(path))
    for idx in [(0, 0, 0), (3, 5, 7), (10, 2, 4)]:
        lps = np.asarray(ref.TransformIndexToPhysicalPoint(idx))
        ras = lps * [-1, -1, 1]
        world = ours.grid.index_to_world(torch.tensor(idx, dtype=torch.float64))
        np.testing.assert_allclose(world.numpy(), ras, atol=1e-4)
    done = fast_register(inputs, moving=path)
    assert_succeeded(done)
    assert "no orientation" in done.stderr


# ---------------------------------------------------------------------------- label maps, masks
def _intensity_as_int16(inputs, work) -> Path:
    img = nib.load(str(inputs["fixed"]))
    data = np.asarray(img.dataobj, np.float32)
    scaled = np.round(data / data.max() * 3000 + np.random.default_rng(0).normal(0, 30, data.shape))
    return _write(work / "t1_int16.nii.gz", scaled, img.affine, np.int16)


def _write(path: Path, data, affine, dtype=np.float32) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), str(path))
    return path


def _label_fault(kind: str, inputs, work) -> tuple[Path, str]:
    img = nib.load(str(inputs["fixed_labels"]))
    lab = np.asarray(img.dataobj)
    if kind == "intensity image":
        return _intensity_as_int16(inputs, work), "does not look like a label map"
    if kind == "fractional":
        return _write(work / "frac.nii.gz", lab + 0.5, img.affine), "non-integer"
    if kind == "nan":
        bad = lab.astype(np.float32)
        bad[0, 0, 0] = np.nan
        return _write(work / "nanlab.nii.gz", bad, img.affine), "NaN"
    if kind == "other grid":
        return _write(work / "small_lab.nii.gz", lab[:-2], img.affine, np.int16), "grid differs"
    if kind == "missing":
        return work / "nolabels.nii.gz", "file not found"
    raise AssertionError(kind)


LABEL_FAULTS = ["intensity image", "fractional", "nan", "other grid", "missing"]


@pytest.mark.parametrize("role", ["fixed", "moving"])
@pytest.mark.parametrize("kind", LABEL_FAULTS)
def test_bad_label_map_is_refused(inputs, work, role, kind):
    bad, problem = _label_fault(kind, inputs, work)
    other = "moving" if role == "fixed" else "fixed"
    done = fast_register(
        inputs,
        f"--{role}-labels",
        bad,
        f"--{other}-labels",
        inputs[f"{other}_labels"],
    )
    assert_refused(done, problem, bad.name)
    assert not (work / "out").exists()


def test_real_label_maps_are_accepted(inputs, work):
    done = fast_register(
        inputs, "--fixed-labels", inputs["fixed_labels"], "--moving-labels", inputs["moving_labels"]
    )
    assert_succeeded(done)
    assert "dice" in json.loads((work / "out" / "metrics.json").read_text())


@pytest.mark.parametrize("role", ["fixed", "moving"])
@pytest.mark.parametrize("kind", ["empty", "missing", "other dimensionality"])
def test_bad_mask_is_refused(inputs, work, role, kind):
    img = nib.load(str(inputs[role]))
    if kind == "empty":
        bad = _write(work / "mask0.nii.gz", np.zeros(img.shape), img.affine, np.uint8)
        problem = "empty"
    elif kind == "missing":
        bad, problem = work / "nomask.nii.gz", "file not found"
    else:
        bad = _write(work / "mask2d.nii.gz", np.ones((20, 20)), np.eye(4), np.uint8)
        problem = "2D"
    done = fast_register(inputs, f"--{role}-mask", bad)
    assert_refused(done, problem, bad.name)
    assert not (work / "out").exists()


# ---------------------------------------------------------------------------- flags
def _files(work: Path) -> dict[str, Path]:
    (work / "bad.yaml").write_text("linear: [\n", encoding="utf-8")
    (work / "unknown.yaml").write_text("lineaar: []\n", encoding="utf-8")
    (work / "evil.yaml").write_text(
        "!!python/object/apply:os.system ['touch pwned']\n", encoding="utf-8"
    )
    (work / "garbage.mat").write_bytes(b"\x00\x01garbage")
    (work / "fake.pt").write_bytes(b"not a checkpoint")
    singular = np.zeros((4, 4))
    singular[3, 3] = 1
    np.savetxt(work / "zero.txt", singular)
    (work / "zero.tfm").write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        "Parameters: 0 0 0 0 0 0 0 0 0 0 0 0\nFixedParameters: 0 0 0\n",
        encoding="utf-8",
    )
    return {}


FLAG_FAULTS = {
    "threads 0": (["--threads", "0"], "--threads must be >= 1"),
    "refine -1": (["--refine", "-1"], "--refine must be >= 0"),
    "output format": (["--output-format", "nifti"], "--output-format"),
    "initial missing": (["--initial-transform", "none.mat"], "none.mat"),
    "initial garbage": (["--initial-transform", "garbage.mat"], "garbage.mat"),
    "initial singular": (["--initial-transform", "zero.tfm"], "singular"),
    "initial inverse missing": (["--initial-transform", "[none.mat,1]"], "none.mat"),
    "init bogus": (["--init", "moments"], "init"),
    "device": (["--device", "tpu"], "expected one of auto, cpu, cuda"),
    "method": (["--method", "nosuch"], "nosuch"),
    "model missing": (["--model", "none.pt"], "none.pt"),
    "model garbage": (["--model", "fake.pt"], "fake.pt"),
    "refine classical": (["--refine", "3"], "--refine N"),
    "config missing": (["--config", "none.yaml"], "none.yaml"),
    "config bad yaml": (["--config", "bad.yaml"], "invalid YAML"),
    "config unknown key": (["--config", "unknown.yaml"], "lineaar"),
    "config python tag": (["--config", "evil.yaml"], "evil.yaml"),
}


@pytest.mark.parametrize("case", list(FLAG_FAULTS))
def test_bad_flag_value_is_refused(inputs, work, case):
    _files(work)
    flags, needle = FLAG_FAULTS[case]
    args = ["register", inputs["fixed"], inputs["moving"], "-o", "out", "-q"]
    if "--config" not in flags:
        args += ["--config", inputs["config"]]
    if case in ("refine classical",):
        args += ["--method", "classical"]
    done = cli(*args, *flags)
    assert_refused(done, needle)
    assert not (work / "out").exists() and not (work / "pwned").exists()


def test_preset_bogus_is_refused(inputs, work):
    done = cli("register", inputs["fixed"], inputs["moving"], "-o", "out", "--preset", "fast")
    assert_refused(done, "preset", "fast")
    assert not (work / "out").exists()


# ---------------------------------------------------------------------------- output folders
def test_non_empty_folder_is_refused_and_untouched(inputs, work):
    (work / "out").mkdir()
    (work / "out" / "notes.txt").write_text("mine")
    before = snapshot(work / "out")
    assert_refused(fast_register(inputs), "not empty", "--overwrite", "out")
    assert snapshot(work / "out") == before and leftovers(work) == []


def test_overwrite_never_deletes_files_learnreg_did_not_write(inputs, work):
    (work / "out").mkdir()
    (work / "out" / "thesis.tex").write_text("years of work")
    before = snapshot(work / "out")
    assert_refused(fast_register(inputs, "--overwrite"), "only a folder that learnreg wrote")
    assert snapshot(work / "out") == before


def test_overwrite_replaces_the_whole_folder(inputs, work):
    assert_succeeded(fast_register(inputs))
    assert (work / "out" / "warp.nii.gz").is_file()
    assert_refused(fast_register(inputs, "--preset", "affine"), "not empty")
    done = cli(
        "register",
        inputs["fixed"],
        inputs["moving"],
        "-o",
        "out",
        "--preset",
        "affine",
        "-q",
        "--no-qc",
        "--overwrite",
    )
    assert_succeeded(done)
    names = {p.name for p in (work / "out").iterdir()}
    assert "affine.mat" in names and "warp.nii.gz" not in names, names  # no stale deformable
    assert json.loads((work / "out" / MARKER).read_text())["command"] == "register"
    assert leftovers(work) == []


def test_empty_existing_folder_is_used(inputs, work):
    (work / "out").mkdir()
    assert_succeeded(fast_register(inputs))
    assert (work / "out" / "affine.mat").is_file()


def test_nested_new_folder_is_created(inputs, work):
    assert_succeeded(fast_register(inputs, out="a/b/c"))
    assert (work / "a" / "b" / "c" / "warp.nii.gz").is_file()


def test_output_that_is_a_file_is_refused(inputs, work):
    (work / "out").write_text("x")
    assert_refused(fast_register(inputs), "not a folder")
    assert (work / "out").read_text() == "x"


def test_current_folder_with_files_is_refused(inputs, work):
    (work / "data.csv").write_text("1,2\n")
    assert_refused(fast_register(inputs, out="."), "not empty")
    assert (work / "data.csv").read_text() == "1,2\n"


def test_stale_staging_of_a_killed_run_is_removed(inputs, work):
    stale = work / ".learnreg-partial-out-dead1234"
    stale.mkdir()
    (stale / "warp.nii.gz").write_bytes(b"half")
    assert_succeeded(fast_register(inputs))
    assert not stale.exists() and leftovers(work) == []


def test_folder_moved_aside_by_a_killed_swap_comes_back(inputs, work):
    assert_succeeded(fast_register(inputs))
    before = snapshot(work / "out")
    os.rename(work / "out", work / ".learnreg-old-out-999-abcd")  # killed between renames
    assert_refused(fast_register(inputs), "not empty")  # the earlier run is back, and protected
    assert snapshot(work / "out") == before and leftovers(work) == []


def test_a_folder_being_written_by_another_run_is_refused(inputs, work):
    import fcntl

    fd = os.open(work / ".learnreg-lock-out", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert_refused(fast_register(inputs), "another learnreg run (pid 4242)")
    finally:
        os.close(fd)
    assert not (work / "out").exists()


def test_full_disk_while_writing_leaves_the_previous_run(inputs, work, monkeypatch):
    import errno

    import learnreg.api.outputs as outputs

    assert_succeeded(fast_register(inputs))
    before = snapshot(work / "out")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "warped.nii.gz")

    monkeypatch.setattr(outputs, "write_image", no_space)
    done = fast_register(inputs, "--overwrite")
    assert_refused(done, "No space left on device", code=1)
    assert snapshot(work / "out") == before and leftovers(work) == []


@pytest.mark.parametrize("shape", [(1, 64), (64, 1), (3, 64), (2, 2)])
def test_degenerate_2d_image_is_refused(inputs, work, shape):
    img = nib.load(str(inputs["moving2d"]))
    data = np.asarray(img.dataobj, np.float32)[: shape[0], : shape[1]]
    thin = _write(work / "thin2d.nii.gz", data, img.affine)
    done = fast_register(inputs, fixed=inputs["fixed2d"], moving=thin)
    assert_refused(done, "thin2d.nii.gz", "fewer than 4 voxels")
    assert not (work / "out").exists()


def test_2d_pair_registers(inputs, work):
    assert_succeeded(fast_register(inputs, fixed=inputs["fixed2d"], moving=inputs["moving2d"]))
    assert (work / "out" / "warp.nii.gz").is_file() and leftovers(work) == []
