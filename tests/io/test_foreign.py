"""FSL FLIRT and FreeSurfer LTA exports of a result's affine (through nitransforms): read
back, they map points as the affine does (< 1e-4 mm); the FLIRT matrix equals the one
computed by hand from FLIRT's definition, the LTA the RAS-to-RAS inverse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.io.foreign import read_foreign_affine
from learnreg.io.result import save_result
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.result import RegistrationResult

pytest.importorskip("nitransforms")


def _grids() -> tuple[Grid, Grid]:
    """An LPBA40-like fixed grid (LPBA's own orientation) and an oblique moving one."""
    fixed = Grid(
        (160, 192, 160), (1.0, 1.0, 1.0), (80.0, -110.0, -70.0), ((-1, 0, 0), (0, 1, 0), (0, 0, 1))
    )
    t = np.deg2rad(15.0)
    rot = ((np.cos(t), -np.sin(t), 0.0), (np.sin(t), np.cos(t), 0.0), (0.0, 0.0, 1.0))
    moving = Grid((120, 140, 110), (1.2, 1.1, 1.5), (-60.0, -80.0, -70.0), rot)
    return fixed, moving


def _affine() -> np.ndarray:
    t = np.deg2rad(8.0)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(t), 0, np.sin(t)], [0, 1.04, 0], [-np.sin(t), 0, np.cos(t)]]
    m[:3, 3] = [4.0, -6.0, 2.5]
    return m


def _flirt_frame(grid: Grid) -> np.ndarray:
    """FLIRT's scaled-voxel coordinates of an image from its voxel indices (x flipped when
    the voxel-to-world determinant is positive)."""
    frame = np.diag([*grid.spacing, 1.0])
    if np.linalg.det(grid.affine[:3, :3]) > 0:
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, grid.shape[0] - 1
        frame = frame @ flip
    return frame


def test_fsl_and_lta_map_points_as_the_affine(tmp_path: Path):
    fixed, moving = _grids()
    m = _affine()
    result = RegistrationResult(fixed, moving, AffineTransform(torch.from_numpy(m).float()))
    files = save_result(result, tmp_path, formats=("ants", "fsl", "lta"))
    assert files["affine_fsl"] == "affine_flirt.mat" and files["affine_lta"] == "affine.lta"
    pts = torch.from_numpy(np.random.default_rng(0).uniform(-60, 60, (50, 3)))
    expected = pts.numpy() @ m[:3, :3].T + m[:3, 3]
    for fmt, name in (("fsl", "affine_flirt.mat"), ("lta", "affine.lta")):
        back = read_foreign_affine(tmp_path / name, fixed, moving, fmt)
        got = back(pts.float().unsqueeze(0))[0].double().numpy()
        assert np.abs(got - expected).max() < 1e-4, fmt
    # FLIRT: moving scaled voxels → fixed scaled voxels, from its definition
    by_hand = (
        _flirt_frame(fixed) @ np.linalg.inv(fixed.affine) @ np.linalg.inv(m)
        @ moving.affine @ np.linalg.inv(_flirt_frame(moving))
    )  # fmt: skip
    written = np.loadtxt(tmp_path / "affine_flirt.mat")
    assert np.abs(written - by_hand).max() < 1e-5
    # LTA: type 1 (RAS to RAS), source = moving, destination = fixed: the inverse affine
    text = (tmp_path / "affine.lta").read_text(encoding="utf-8").splitlines()
    assert any(
        line.split("=")[0].strip() == "type" and line.split("=")[1].strip() == "1" for line in text
    )
    start = text.index("1 4 4") + 1
    lta = np.array([[float(v) for v in row.split()] for row in text[start : start + 4]])
    assert np.abs(lta - np.linalg.inv(m)).max() < 1e-6


def test_two_dimensional_results_are_refused(tmp_path: Path):
    grid = Grid((64, 64))
    result = RegistrationResult(grid, grid, AffineTransform.identity(2))
    with pytest.raises(InputError, match="FSL and LTA transforms are 3D"):
        save_result(result, tmp_path, formats=("fsl",))
