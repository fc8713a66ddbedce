"""``learnreg register``'s flags of the field on real 2D slices: --initial-transform (ANTs
syntax), --output-format h5, --no-qc, -v with a log file, --threads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

import learnreg
from learnreg.cli.main import app
from learnreg.core.errors import InputError
from learnreg.io.images import read_image
from learnreg.io.result import load_result
from learnreg.io.transforms import read_affine, write_affine
from learnreg.spatial.affine import AffineTransform

FIXED, MOVING = "ants2d/r16slice.jpg", "ants2d/r64slice.jpg"


def _run(*args: str) -> None:
    res = CliRunner().invoke(app, ["register", *args, "-q"])
    assert res.exit_code == 0, (res.output, res.exception)


def _rotation(grid, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    c = np.asarray(grid.center)
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = rot, c - rot @ c + np.asarray(shift)
    return m


def test_initial_transform_from_an_ants_mat_equals_the_api_matrix(data_root: Path, tmp_path: Path):
    fixed, moving = str(data_root / FIXED), str(data_root / MOVING)
    m = _rotation(read_image(fixed).grid, 12.0, (4.0, -3.0))
    write_affine(tmp_path / "init.mat", AffineTransform(torch.from_numpy(m).float()))
    write_affine(tmp_path / "inv.mat", AffineTransform(torch.from_numpy(m).float()).inverse())
    api = learnreg.register(fixed, moving, preset="rigid", initial=m).result.affine.matrix
    for spec, out in ((str(tmp_path / "init.mat"), "a"), (f"[{tmp_path / 'inv.mat'},1]", "b")):
        _run(
            fixed,
            moving,
            "-o",
            str(tmp_path / out),
            "--preset",
            "rigid",
            "--initial-transform",
            spec,
        )
        got = read_affine(tmp_path / out / "affine.mat").matrix
        assert torch.allclose(got, api, atol=1e-5), spec
    plain = learnreg.register(fixed, moving, preset="rigid").result.affine.matrix
    assert not torch.allclose(plain, api, atol=1e-3)  # the start was used


def test_h5_composites_map_points_as_the_result_and_the_flags_hold(data_root: Path, tmp_path: Path):
    out = tmp_path / "out"
    n = torch.get_num_threads()
    _run(str(data_root / FIXED), str(data_root / MOVING), "-o", str(out), "--output-format", "h5",
         "--no-qc", "-v", "--threads", "2")  # fmt: skip
    assert torch.get_num_threads() == 2
    torch.set_num_threads(n)
    assert not (out / "qc.png").exists()
    log = (out / "learnreg.log").read_text()
    assert "using classical registration" in log and "registered in" in log
    result = load_result(out)
    assert result.deformable is not None
    rng = np.random.default_rng(0)
    grid = result.fixed_grid
    idx = torch.from_numpy(rng.uniform(20, 230, size=(200, 2)))
    pts = grid.index_to_world(idx).double()
    # moving-space points whose affine-inverse images are inner fixed-grid points (outside
    # its field ITK's displacement is zero, ours the border's)
    moved = result.linear()(pts.float().unsqueeze(0))[0].double()
    for name, inverse, x in (("transform.h5", False, pts), ("inverse_transform.h5", True, moved)):
        tx = sitk.ReadTransform(str(out / name))
        lps = x.numpy() * np.array([-1.0, -1.0])
        theirs = np.array([tx.TransformPoint(tuple(p)) for p in lps]) * np.array([-1.0, -1.0])
        ours = result.map_points(x, inverse=inverse).double().numpy()
        # the h5 holds the same fields as the .nii.gz files (float64 sampled on the same grid)
        assert np.abs(theirs - ours).max() < 1e-4, name
    assert (out / "affine.mat").is_file() and (out / "warp.nii.gz").is_file()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--threads", "0"], "--threads must be >= 1"),
        (["--output-format", "fsl2"], "--output-format"),
        (["--initial-transform", "missing.mat"], "missing.mat"),
        (["--device", "tpu"], "expected one of auto, cpu, cuda, cuda:N"),
        pytest.param(
            ["--device", "cuda"],
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_bad_flag_values_are_clean_errors(data_root: Path, tmp_path: Path, flags, message):
    res = CliRunner().invoke(
        app,
        [
            "register",
            str(data_root / FIXED),
            str(data_root / MOVING),
            "-o",
            str(tmp_path / "o"),
            *flags,
        ],
    )
    assert isinstance(res.exception, InputError) and message in str(res.exception)
    assert not (tmp_path / "o").exists()
