"""The issue-11 proof for one learned method: ``learnreg train`` a tiny model on real data,
``learnreg register --model`` a pair given at another spacing and an oblique direction, and
replay the written files with SimpleITK.

Shared by the method tests (each supplies its training config and its pair); the commands run
in-process through the real Typer app, as the console script runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import yaml
from typer.testing import CliRunner

from learnreg.cli.main import app
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.io.images import read_image, write_image
from learnreg.spatial.linear import rotation_matrix
from learnreg.spatial.sampling import resample


def invoke(*args: str | Path) -> str:
    """Run a learnreg command in-process; fail with its output unless it exits 0."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        detail = result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            detail += f"\n{type(result.exception).__name__}: {result.exception}"
        raise AssertionError(f"learnreg {' '.join(map(str, args))} failed:\n{detail}")
    return result.output


def train(config: dict, folder: Path) -> Path:
    """``learnreg train`` of ``config`` into ``folder``; returns the last checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump({"progress": False, "device": "cpu", **config}))
    invoke("train", path, "-o", folder / "run")
    return folder / "run" / "checkpoints" / "last.pt"


def oblique(image: Image, spacing: tuple[float, ...], degrees: float, name: str) -> Image:
    """``image`` resampled onto a grid of ``spacing`` rotated by ``degrees`` (about the last
    world axis in 3D) around its centre, covering the same field of view."""
    d = image.ndim
    omega = (
        torch.tensor([[np.radians(degrees)]])
        if d == 2
        else torch.tensor([[0.0, 0.0, np.radians(degrees)]])
    )
    rot = rotation_matrix(omega.double())[0].numpy()
    direction = rot @ np.asarray(image.grid.direction)
    extent = np.asarray(image.grid.extent)
    shape = tuple(int(round(e / s)) + 1 for e, s in zip(extent, spacing, strict=True))
    centre = np.asarray(image.grid.center)
    origin = centre - direction @ ((np.asarray(shape) - 1) / 2 * np.asarray(spacing))
    grid = Grid(shape, tuple(spacing), tuple(origin), tuple(map(tuple, direction)))
    return Image(resample(image, grid).data, grid, name)


def write(image: Image, path: Path) -> Path:
    write_image(image, path)
    return path


def _sitk_replay(out: Path, fixed: Path, moving: Path) -> np.ndarray:
    manifest = json.loads((out / "result.json").read_text())
    fixed_img = sitk.ReadImage(str(fixed))
    moving_img = sitk.ReadImage(str(moving), sitk.sitkFloat32)
    d = fixed_img.GetDimension()
    comp = sitk.CompositeTransform(d)
    files = manifest["files"]
    if "affine" in files:
        comp.AddTransform(sitk.ReadTransform(str(out / files["affine"])))
    if "warp" in files:
        field = sitk.Cast(sitk.ReadImage(str(out / files["warp"])), sitk.sitkVectorFloat64)
        comp.AddTransform(sitk.DisplacementFieldTransform(field))
    warped = sitk.Resample(moving_img, fixed_img, comp, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(warped).T


def oblique_slices(data_root: Path, moving: str = "r64slice") -> tuple[Image, Image]:
    """The standard proof pair: real 2D slices ``r16slice`` (fixed) and ``moving`` at other
    spacings (0.9×1.2 and 1.1×0.8 mm) and directions (+20° and −15°) than any training grid."""
    slices = data_root / "ants2d"
    fixed = oblique(read_image(slices / "r16slice.jpg"), (0.9, 1.2), 20.0, "f")
    return fixed, oblique(read_image(slices / f"{moving}.jpg"), (1.1, 0.8), -15.0, "m")


def register_and_replay(
    checkpoint: Path, fixed: Image | Path, moving: Image | Path, out: Path
) -> dict:
    """``learnreg register --model`` (images are written as NIfTI beside ``out`` first) and
    the SimpleITK replay of its files; fails unless the replay matches (MAD ≤ 1 %).

    Returns ``mad`` (mean |learnreg − SimpleITK| as a fraction of the moving image's range),
    the manifest, ``max_warp_mm`` (largest displacement of the written warp, 0 without one),
    and for linear results ``matrix_error`` (max |A_sitk − A_prediction| of the homogeneous
    RAS matrices, the prediction being the result's own affine).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(fixed, Image):
        fixed = write(fixed, out.parent / "fixed.nii.gz")
    if isinstance(moving, Image):
        moving = write(moving, out.parent / "moving.nii.gz")
    invoke("register", fixed, moving, "-o", out, "--model", checkpoint, "-q")
    ours = np.asarray(nib.load(str(out / "warped.nii.gz")).get_fdata(), dtype=np.float64)
    ref = _sitk_replay(out, fixed, moving)
    moving_data = read_image(moving).data
    span = float(moving_data.max() - moving_data.min())
    manifest = json.loads((out / "result.json").read_text())
    report = {"mad": float(np.abs(ours.reshape(ref.shape) - ref).mean()) / span}
    assert report["mad"] <= 0.01, f"SimpleITK replays {out} with MAD {report['mad']:.3g}"
    report["manifest"] = manifest
    report["max_warp_mm"] = 0.0
    if "warp" in manifest["files"]:
        warp = read_image(out / manifest["files"]["warp"], allow_channels=True).data
        report["max_warp_mm"] = float(warp.norm(dim=0).max())
    if "affine" in manifest["files"]:
        from learnreg.io.result import load_result

        mine = load_result(out).affine.homogeneous()[0].double().numpy()
        tx = sitk.ReadTransform(str(out / manifest["files"]["affine"]))
        report["matrix_error"] = float(np.abs(_sitk_ras_matrix(tx, mine.shape[0] - 1) - mine).max())
    return report


def _sitk_ras_matrix(tx: sitk.Transform, d: int) -> np.ndarray:
    """The homogeneous RAS matrix of a linear SimpleITK transform (LPS inside ITK), read off
    the transform's action on points."""
    flip = np.diag([-1.0, -1.0] + [1.0] * (d - 2))
    pts = np.vstack([np.zeros(d), np.eye(d)]) * 50.0
    mapped = np.array([flip @ tx.TransformPoint(tuple(flip @ p)) for p in pts])
    m = np.eye(d + 1)
    m[:d, d] = mapped[0]
    m[:d, :d] = ((mapped[1:] - mapped[0]) / 50.0).T
    return m


def lpba_pairs_config(method: str, method_config: dict, shape: list[int]) -> dict:
    """A 4-step `learnreg train` config of an unsupervised method on LPBA40 pairs at 8 mm (the
    dense-warp source's pairs of S11/S12, validated on S35; the known field goes unused)."""
    return {
        "method": method,
        "method_config": method_config,
        "data": {
            "shape": shape,
            "synthetic": {
                "kind": "warp",
                "images": "lpba40",
                "transform": "dense",
                "subjects": ["S11", "S12"],
                "val_subjects": ["S35"],
                "field_spacings": [8, 4],
                "length": 8,
                "val_length": 2,
            },
        },
        "optimizer": {"lr": 1e-3},
        "steps": 4,
        "batch_size": 2,
        "val_every": 2,
    }
