"""End-to-end command line: register, apply (both directions), and bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from learnreg.core.run_folder import MARKER
from learnreg.io.images import read_image

EXPECTED = {
    "warped.nii.gz",
    "affine.mat",
    "affine_inverse.mat",
    "warp.nii.gz",
    "inverse_warp.nii.gz",
    "jacobian.nii.gz",
    "qc.png",
    "metrics.json",
    "result.json",
}


def learnreg(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "learnreg", *map(str, args)], capture_output=True, text=True
    )


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


@pytest.fixture(scope="module")
def pair(data_root, tmp_path_factory) -> dict[str, Path]:
    """Two real 2D slices at 128×128 (2 mm), a label map and points of the moving one."""
    tmp = tmp_path_factory.mktemp("pair")
    aff = np.diag([2.0, 2.0, 1.0, 1.0])
    out = {}
    for role, name in (("fixed", "r16"), ("moving", "r64")):
        img = read_image(data_root / f"ants2d/{name}slice.jpg").data[0].numpy()[::2, ::2]
        out[role] = _save(tmp / f"{role}.nii.gz", img.astype(np.float32), aff)
        out[f"{role}_labels"] = _save(
            tmp / f"{role}_labels.nii.gz", (img > 60).astype(np.uint8) + (img > 130), aff
        )
    pts = tmp / "moving_points.csv"
    pts.write_text("x,y,label\n100.0,120.0,a\n140.0,90.0,b\n")
    out["points"] = pts
    return out


@pytest.fixture(scope="module")
def registered(pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    done = learnreg(
        "register",
        pair["fixed"],
        pair["moving"],
        "-o",
        out,
        "-q",
        "--fixed-labels",
        pair["fixed_labels"],
        "--moving-labels",
        pair["moving_labels"],
        "--qc",
        "--jacobian",
    )
    assert done.returncode == 0, done.stderr
    return out


def test_register_writes_everything(registered):
    names = {p.name for p in registered.iterdir()}
    assert EXPECTED <= names, EXPECTED - names
    assert not [n for n in names if n.startswith(".") and n != MARKER], "staging files left"
    assert not [p for p in registered.parent.iterdir() if p.name.startswith(".")]
    metrics = json.loads((registered / "metrics.json").read_text())
    assert metrics["dice"] > metrics["dice_affine"]
    assert metrics["lncc_final"] > metrics["lncc_affine"]
    assert metrics["jacobian"]["folding_fraction"] == 0.0
    manifest = json.loads((registered / "result.json").read_text())
    assert manifest["ants_forward_transforms"] == ["warp.nii.gz", "affine.mat"]


def test_apply_images_labels_points_both_directions(registered, pair, tmp_path):
    done = learnreg("apply", registered, pair["moving"], "-o", tmp_path / "fwd")
    assert done.returncode == 0, done.stderr
    ours = read_image(tmp_path / "fwd/moving.nii.gz").data
    ref = read_image(registered / "warped.nii.gz").data
    assert float((ours - ref).abs().max()) < 1e-3

    done = learnreg("apply", registered, pair["moving_labels"], "--labels", "-o", tmp_path / "lab")
    assert done.returncode == 0, done.stderr
    lab = read_image(tmp_path / "lab/moving_labels.nii.gz").data
    assert set(np.unique(lab.numpy())) <= {0, 1, 2}

    done = learnreg("apply", registered, pair["fixed"], "--inverse", "-o", tmp_path / "inv")
    assert done.returncode == 0, done.stderr
    inv = read_image(tmp_path / "inv/fixed.nii.gz")
    assert inv.grid.allclose(read_image(pair["moving"]).grid)

    # points: moving → fixed, then back with --inverse, returns the originals
    done = learnreg("apply", registered, pair["points"], "-o", tmp_path / "p1")
    assert done.returncode == 0, done.stderr
    done = learnreg(
        "apply", registered, tmp_path / "p1/moving_points.csv", "--inverse", "-o", tmp_path / "p2"
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(tmp_path / "p2/moving_points.csv")))
    back = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    assert np.abs(back - [[100, 120], [140, 90]]).max() < 0.5
    assert [r["label"] for r in rows] == ["a", "b"]


def _bad(tmp_path: Path, fixed: Path, moving: Path, needle: str, out: Path | None = None) -> None:
    out = out or tmp_path / "out"
    done = learnreg("register", fixed, moving, "-o", out, "-q")
    assert done.returncode != 0
    lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, done.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    if out.exists():
        assert not [p for p in out.rglob("*") if p.is_file()], "half-written outputs"


def test_bad_input_missing_and_unreadable(pair, tmp_path):
    _bad(tmp_path, tmp_path / "nope.nii.gz", pair["moving"], "nope.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image")
    _bad(tmp_path, pair["fixed"], junk, "junk.nii.gz")


def test_bad_input_content(pair, tmp_path):
    four = _save(tmp_path / "four.nii.gz", np.zeros((8, 8, 8, 3), np.float32))
    _bad(tmp_path, four, pair["moving"], "four.nii.gz")
    arr = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    arr[2, 2, 2] = np.nan
    _bad(tmp_path, pair["fixed"], _save(tmp_path / "nan.nii.gz", arr), "nan.nii.gz")
    nan2d = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    nan2d[5, 5] = np.nan
    _bad(tmp_path, pair["fixed"], _save(tmp_path / "nan2d.nii.gz", nan2d), "NaN")
    flat = _save(tmp_path / "flat.nii.gz", np.ones((64, 64), np.float32))
    _bad(tmp_path, pair["fixed"], flat, "flat.nii.gz")
    vol = _save(
        tmp_path / "vol.nii.gz", np.random.default_rng(1).random((16, 16, 16)).astype(np.float32)
    )
    _bad(tmp_path, pair["fixed"], vol, "vol.nii.gz")


def test_bad_output_folder(pair, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _bad(tmp_path, pair["fixed"], pair["moving"], "a_file", out=blocker / "sub")


def test_console_script_prints_one_line_errors(tmp_path):
    """The installed ``learnreg`` entry point (not only ``python -m``) handles bad input."""
    script = Path(sys.executable).parent / "learnreg"
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    done = subprocess.run(
        [
            str(script),
            "register",
            str(tmp_path / "a.nii.gz"),
            str(tmp_path / "b.nii.gz"),
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "a.nii.gz: file not found" in done.stderr
