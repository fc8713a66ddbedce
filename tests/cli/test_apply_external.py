"""``learnreg apply -t ...`` with ANTs' own registration output reproduces antsApplyTransforms
(ANTsPy's ``apply_transforms`` / ``apply_transforms_to_points``) on a real 2D pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from learnreg.cli.main import app
from learnreg.io.images import read_image, write_image
from learnreg.io.objects import as_image

ants = pytest.importorskip("ants")
pd = pytest.importorskip("pandas")  # ANTsPy's point tables


@pytest.fixture(scope="module")
def ants_run(data_root: Path, tmp_path_factory) -> dict:
    """ANTs SyN (brief) of two real slices, with its transform files on disk."""
    folder = tmp_path_factory.mktemp("ants")
    for name, src in (("fixed", "r16slice.jpg"), ("moving", "r64slice.jpg")):
        write_image(read_image(data_root / "ants2d" / src), folder / f"{name}.nii.gz")
    fixed = ants.image_read(str(folder / "fixed.nii.gz"))
    moving = ants.image_read(str(folder / "moving.nii.gz"))
    reg = ants.registration(
        fixed, moving, "SyN", reg_iterations=(20, 10, 0), outprefix=str(folder / "ants_")
    )
    return {"folder": folder, "fixed": fixed, "moving": moving, **reg}


def _apply(*args) -> None:
    res = CliRunner().invoke(app, ["apply", *map(str, args)])
    assert res.exit_code == 0, (res.output, res.exception)


def _mad_percent(ours: Path, theirs, reference) -> float:
    a = read_image(ours).data[0].numpy()
    b = as_image(theirs).data[0].numpy()
    ref = reference.numpy()
    return float(np.abs(a - b).mean() / (ref.max() - ref.min()) * 100)


def test_forward_and_inverse_images_match_ants(ants_run: dict, tmp_path: Path):
    d, fwd, inv = ants_run["folder"], ants_run["fwdtransforms"], ants_run["invtransforms"]
    assert fwd[0].endswith("Warp.nii.gz") and fwd[1].endswith(".mat")
    _apply(
        d / "moving.nii.gz",
        "-t",
        fwd[0],
        "-t",
        fwd[1],
        "-r",
        d / "fixed.nii.gz",
        "-o",
        tmp_path / "f",
    )
    theirs = ants.apply_transforms(ants_run["fixed"], ants_run["moving"], fwd)
    assert _mad_percent(tmp_path / "f" / "moving.nii.gz", theirs, ants_run["moving"]) < 0.2
    # the inverse: antsApplyTransforms -t [affine,1] -t InverseWarp
    _apply(
        d / "fixed.nii.gz",
        "-t",
        f"[{inv[0]},1]",
        "-t",
        inv[1],
        "-r",
        d / "moving.nii.gz",
        "-o",
        tmp_path / "i",
    )
    theirs = ants.apply_transforms(
        ants_run["moving"], ants_run["fixed"], inv, whichtoinvert=[True, False]
    )
    assert _mad_percent(tmp_path / "i" / "fixed.nii.gz", theirs, ants_run["fixed"]) < 0.2


def test_points_are_mapped_as_ants_maps_them(ants_run: dict, tmp_path: Path):
    rng = np.random.default_rng(0)
    grid = read_image(ants_run["folder"] / "fixed.nii.gz").grid
    ras = grid.index_to_world(torch.from_numpy(rng.uniform(40, 210, size=(30, 2)))).numpy()
    csv = tmp_path / "points.csv"
    pd.DataFrame({"x": ras[:, 0], "y": ras[:, 1]}).to_csv(csv, index=False)
    fwd = ants_run["fwdtransforms"]
    _apply(csv, "-t", fwd[0], "-t", fwd[1], "-o", tmp_path / "p")
    ours = pd.read_csv(tmp_path / "p" / "points.csv")[["x", "y"]].to_numpy()
    lps = pd.DataFrame({"x": -ras[:, 0], "y": -ras[:, 1]})
    theirs = ants.apply_transforms_to_points(2, lps, fwd)[["x", "y"]].to_numpy() * -1.0
    assert np.abs(ours - theirs).max() < 1e-3
