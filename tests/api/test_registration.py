"""The Python API (``learnreg.register`` & co.) on real 2D slices: the README's example, every
kind of input image, initial transforms, the command line's equivalence, and replay of the
saved files — in both directions — with exactly the ANTsPy and SimpleITK calls documented."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

import learnreg
from learnreg.cli.main import app
from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.io.images import read_image, write_image
from learnreg.io.objects import as_image, like
from learnreg.io.transforms import read_affine, write_affine
from learnreg.spatial.affine import AffineTransform

README = Path(__file__).resolve().parents[2] / "README.md"
FIXED, MOVING = "ants2d/r16slice.jpg", "ants2d/r64slice.jpg"


def _mad_percent(a: np.ndarray, b: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(a - b).mean() / (reference.max() - reference.min()) * 100)


@pytest.fixture(scope="module")
def saved(data_root: Path, tmp_path_factory) -> tuple[learnreg.Registration, Path]:
    """The default (affine + diffeomorphic) registration of two real slices, saved."""
    reg = learnreg.register(data_root / FIXED, data_root / MOVING)
    return reg, reg.save(tmp_path_factory.mktemp("api") / "out")


def test_readme_python_example_runs(data_root: Path, tmp_path: Path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- python-api-example[^\n]*\n```python\n(.*?)```", text, re.S)
    assert block, "README.md has no python-api-example block"
    code = block.group(1).replace("../shared/data", str(data_root))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    reg = scope["reg"]
    assert "classical" in repr(reg) and reg.result.deformable is not None
    assert (tmp_path / "out-api" / "warp.nii.gz").is_file()
    assert (tmp_path / "out-api" / "metrics.json").is_file()
    warped = scope["warped"].data  # the saved warp is re-interpolated: float32 rounding
    span = float(warped.max() - warped.min())
    assert float((scope["same"].data - warped).abs().max()) < 1e-5 * span
    assert isinstance(scope["back"], nib.Nifti1Image)
    assert scope["back"].shape == read_image(data_root / MOVING).grid.shape
    assert scope["affine_only"].result.deformable is None
    assert scope["points"].shape == (1, 2)
    assert isinstance(scope["tx"], sitk.CompositeTransform)
    assert [Path(f).name for f in scope["ants_args"]["transformlist"]] == [
        "warp.nii.gz",
        "affine.mat",
    ]


def test_every_kind_of_image_reads_as_its_file_does(tmp_path: Path):
    """nibabel, SimpleITK and ANTsPy images read from a file place it where our reader
    does; what comes back is of the kind given and lands where that library reads it."""
    t = np.deg2rad(20.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, -1.0]])
    grid = Grid((20, 18, 16), (1.5, 1.0, 2.0), (-10.0, 4.0, 7.0), tuple(map(tuple, rot)))
    path = write_image(Image(torch.rand(1, 20, 18, 16), grid, "x"), tmp_path / "o.nii.gz")
    ours = read_image(path)
    loaded = nib.load(str(path))
    for obj in (loaded, sitk.ReadImage(str(path)), (np.asarray(loaded.dataobj), loaded.affine)):
        got = as_image(obj)
        assert got.grid.allclose(ours.grid, atol=1e-5), type(obj)
        assert torch.allclose(got.data, ours.data)
        back = like(obj, got)
        assert type(back) is type(obj)
        again = as_image(back)
        assert again.grid.allclose(ours.grid, atol=1e-5) and torch.allclose(again.data, ours.data)
    ants = pytest.importorskip("ants")
    a = ants.image_read(str(path))
    assert as_image(a).grid.allclose(ours.grid, atol=1e-5)
    b = like(a, ours)
    assert np.allclose(b.origin, a.origin) and np.allclose(b.direction, a.direction)
    assert np.allclose(b.numpy(), a.numpy())


def test_same_result_from_every_kind_of_input(data_root: Path):
    f, m = read_image(data_root / FIXED), read_image(data_root / MOVING)
    ref = learnreg.register(data_root / FIXED, data_root / MOVING, preset="affine")
    nib_kind = nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4))
    sitk_kind = sitk.Image(2, 2, sitk.sitkFloat32)
    for fixed, moving in (
        (like(nib_kind, f), like(nib_kind, m)),
        (like(sitk_kind, f), like(sitk_kind, m)),
        ((f.data[0].numpy(), f.grid.affine), (m.data[0].numpy(), m.grid.affine)),
    ):
        reg = learnreg.register(fixed, moving, preset="affine")
        assert torch.allclose(reg.result.affine.matrix, ref.result.affine.matrix, atol=1e-5)
        warped = reg.warp(moving)
        assert type(warped) is type(moving)
        assert torch.allclose(as_image(warped).data, ref.warped.data, atol=1e-4)


def test_bare_arrays_and_unknown_objects_are_refused(data_root: Path):
    with pytest.raises(InputError, match="affine"):
        learnreg.register(np.zeros((8, 8)), data_root / MOVING)
    with pytest.raises(InputError, match="cannot read an image from a dict"):
        learnreg.register({}, data_root / MOVING)
    with pytest.raises(InputError, match="4x4"):
        learnreg.register((np.ones((8, 8)), np.eye(2)), data_root / MOVING)


def test_initial_transform_from_a_file_equals_the_matrix(data_root: Path, tmp_path: Path):
    """An ITK .mat, the same matrix, and the inverse file with ``(file, True)`` start the
    registration identically (all three give the same result)."""
    f = read_image(data_root / FIXED)
    c = torch.tensor(f.grid.center, dtype=torch.float64)
    t = np.deg2rad(12.0)
    rot = torch.tensor([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]], dtype=torch.float64)
    m = torch.eye(3, dtype=torch.float64)
    m[:2, :2], m[:2, 2] = rot, c - rot @ c + torch.tensor([4.0, -3.0], dtype=torch.float64)
    write_affine(tmp_path / "init.mat", AffineTransform(m.float()))
    write_affine(tmp_path / "init_inv.mat", AffineTransform(m.float()).inverse())
    assert np.allclose(read_affine(tmp_path / "init.mat").matrix[0].numpy(), m.numpy(), atol=1e-5)
    results = [
        learnreg.register(data_root / FIXED, data_root / MOVING, preset="rigid", initial=init)
        for init in (m.numpy(), tmp_path / "init.mat", (tmp_path / "init_inv.mat", True))
    ]
    for r in results[1:]:
        assert torch.allclose(r.result.affine.matrix, results[0].result.affine.matrix, atol=1e-4)
    plain = learnreg.register(data_root / FIXED, data_root / MOVING, preset="rigid")
    # the start matters: a 12° rotation does not optimize to the same rigid as the default start
    assert not torch.allclose(
        plain.result.affine.matrix, results[0].result.affine.matrix, atol=1e-3
    )


def test_command_line_writes_what_the_api_saves(data_root: Path, tmp_path: Path):
    args = [str(data_root / FIXED), str(data_root / MOVING)]
    res = CliRunner().invoke(
        app, ["register", *args, "-o", str(tmp_path / "cli"), "--preset", "affine", "-q"]
    )
    assert res.exit_code == 0, res.output
    learnreg.register(*args, preset="affine").save(tmp_path / "api")
    a, b = (
        read_affine(tmp_path / "cli" / "affine.mat"),
        read_affine(tmp_path / "api" / "affine.mat"),
    )
    assert torch.allclose(a.matrix, b.matrix, atol=1e-6)
    assert sorted(os.listdir(tmp_path / "cli")) == sorted(os.listdir(tmp_path / "api"))


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_documented_replay_calls_reproduce_the_result(
    saved, data_root: Path, direction: str, monkeypatch
):
    """``result.json``'s ``replay`` calls, run as written in the result folder, reproduce our
    own warp in ANTsPy and SimpleITK; ANTsPy's default ``whichtoinvert`` would not."""
    reg, folder = saved
    f, m = read_image(data_root / FIXED), read_image(data_root / MOVING)
    ours = reg.warp(f, inverse=True) if direction == "inverse" else reg.warped
    reference = (f if direction == "inverse" else m).data[0].numpy()
    replay = json.loads((folder / "result.json").read_text(encoding="utf-8"))["replay"][direction]
    monkeypatch.chdir(folder)
    kind = sitk.Image(2, 2, sitk.sitkFloat32)
    images = {"fixed": like(kind, f), "moving": like(kind, m)}
    got = as_image(eval(replay["SimpleITK"], {"sitk": sitk}, images)).data[0].numpy()
    assert _mad_percent(got, ours.data[0].numpy(), reference) <= 1.0
    ants = pytest.importorskip("ants")
    write_image(f, folder / "f.nii.gz")
    write_image(m, folder / "m.nii.gz")
    images = {"fixed": ants.image_read("f.nii.gz"), "moving": ants.image_read("m.nii.gz")}
    got = as_image(eval(replay["ants.apply_transforms"], {"ants": ants}, images)).data[0].numpy()
    assert _mad_percent(got, ours.data[0].numpy(), reference) <= 1.0
    args = reg.to_ants(inverse=direction == "inverse")
    assert args["whichtoinvert"] == [False, False]
    if direction == "inverse":  # the trap: ANTsPy's default inverts the leading .mat again
        ref_img, mov_img = images["moving"], images["fixed"]
        trap = ants.apply_transforms(ref_img, mov_img, transformlist=args["transformlist"])
        assert _mad_percent(as_image(trap).data[0].numpy(), ours.data[0].numpy(), reference) > 2.0
