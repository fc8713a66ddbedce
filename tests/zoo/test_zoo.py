"""Trained models end to end on real 3D brains: train (3D LPBA40, 4 mm), export, load,
predict in physical space, refine, and the ``register --model/--method/--refine`` CLI.

The module trains one small diffeomorphic VoxelMorph atlas-to-subject (S01 ← S11–S16, affinely
pre-aligned, 4 mm) once; S35 is held out. The shipped model, when installed, is checked on a
held-out subject at full resolution.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from learnreg.api.registration import choose_model
from learnreg.cli.main import app
from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.io.images import read_image, read_labels, write_image
from learnreg.metrics import jacobian_stats, mean_dice
from learnreg.spatial.sampling import resample
from learnreg.train.checkpoint import save_checkpoint
from learnreg.zoo.models import AUTO_ORDER, available_models, export_model, load_model
from learnreg.zoo.predict import predict

TRAIN = ("S11", "S12", "S13", "S14", "S15", "S16")
HELD_OUT = "S35"


@pytest.fixture(scope="module")
def lpba4mm(lpba: Path, tmp_path_factory) -> Path:
    """LPBA40 S01, S11–S16 and S35 resampled to 4 mm (their own grids, so affines differ)."""
    out = tmp_path_factory.mktemp("lpba4mm")
    pre = Preprocessor(NetworkGrid(spacing=(4.0, 4.0, 4.0), orientation="native"), None)
    for sub in ("images", "labels"):
        (out / sub).mkdir()
    for name in ("S01", *TRAIN, HELD_OUT):
        img = read_image(lpba / "images" / f"{name}.nii.gz")
        grid = pre.grid_for(img)
        write_image(pre.image(img, grid), out / "images" / f"{name}.nii.gz")
        lab = pre.labels(read_labels(lpba / "labels" / f"{name}.nii.gz"), grid)
        write_image(lab, out / "labels" / f"{name}.nii.gz", dtype="uint8")
    return out


@pytest.fixture(scope="module")
def trained(lpba4mm: Path, tmp_path_factory) -> Path:
    """A checkpoint of `learnreg train` (3D, SVF, Dice + LNCC), exported as a model folder."""
    from learnreg.cli.train import run_training

    run = tmp_path_factory.mktemp("run")
    cfg = {
        "method": "voxelmorph-weakly",
        "method_config": {
            "ndim": 3,
            "enc_features": [8, 16, 16],
            "dec_features": [16, 16, 16, 8],
            "window": 5,
            "integration_steps": 5,
            "int_downsize": 2,
        },
        "data": {
            "images": str(lpba4mm / "images"),
            "labels": str(lpba4mm / "labels"),
            "atlas": "S01",
            "train": list(TRAIN),
            "val": [HELD_OUT],
            "spacing": [4.0, 4.0, 4.0],
            "levels": 3,
            "prealign": "affine",
        },
        "optimizer": {"lr": 3e-3},
        "steps": 100,
        "val_every": 100,
        "checkpoint_every": 100,
        "progress": False,
        "device": "cpu",
        "output": str(run),
    }
    (run / "train.yaml").write_text(yaml.safe_dump(cfg))
    summary = run_training(run / "train.yaml")
    assert summary["step"] == 100
    card = {
        "title": "test model",
        "suits": {"max_spacing": 5.0, "extent": [0.75, 1.5], "min_background": 0.3},
    }
    export_model(run / "checkpoints" / "last.pt", run / "model", card)
    return run / "model"


def _pair(folder: Path, moving: str = HELD_OUT):
    f = read_image(folder / "images" / "S01.nii.gz")
    m = read_image(folder / "images" / f"{moving}.nii.gz")
    fl = read_labels(folder / "labels" / "S01.nii.gz")
    ml = read_labels(folder / "labels" / f"{moving}.nii.gz")
    return f, m, fl, ml


def test_trained_model_registers_held_out_subject(trained, lpba4mm):
    model = load_model(trained)
    assert model.prealign == "affine" and model.ndim == 3 and model.card["title"] == "test model"
    assert not model.method.training
    f, m, fl, ml = _pair(lpba4mm)
    assert model.unsuitable(f, m) is None
    result = predict(f, m, model)
    assert result.info["device"] == "cpu"
    assert result.fixed_grid.allclose(f.grid) and result.deformable.grid.allclose(f.grid)
    affine_dice = mean_dice(fl.data[0], resample(ml, f.grid, result.linear(), mode="label").data[0])
    dice = mean_dice(fl.data[0], result.warp(ml, mode="label").data[0])
    identity = mean_dice(fl.data[0], resample(ml, f.grid, mode="label").data[0])
    assert dice > affine_dice + 0.01, (identity, affine_dice, dice)
    assert jacobian_stats(result.deformable.voxel_field())["folding_count"] == 0
    # the inverse is exp(-v): composing both brings fixed points back (mm, inside the brain)
    pts = f.grid.world_points()[10:30:5, 12:36:6, 10:30:5].reshape(1, -1, 3)
    there = result.deformable(pts)
    back = result.inverse_deformable(there)
    assert (back - pts).norm(dim=-1).max() < 0.5

    refined = predict(f, m, model, refine=15)
    refined_dice = mean_dice(fl.data[0], refined.warp(ml, mode="label").data[0])
    assert refined_dice > dice, (dice, refined_dice)
    assert jacobian_stats(refined.deformable.voxel_field())["folding_count"] == 0
    assert refined.info["refine"] == 15 and refined.info["model"] == str(trained)


def test_training_checkpoint_loads_as_model(trained):
    ckpt = trained.parent / "checkpoints" / "last.pt"
    model = load_model(ckpt)
    shipped = load_model(trained)
    for k, v in shipped.method.state_dict().items():
        assert torch.equal(v, model.method.state_dict()[k])
    assert model.reference == shipped.reference


def test_load_model_errors(tmp_path, trained):
    with pytest.raises(InputError, match="no such model"):
        load_model("no-such-model")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pt"):
        load_model(bad)
    bare = tmp_path / "bare.pt"  # a checkpoint without the preprocessing record
    model = load_model(trained).method
    save_checkpoint(bare, model=model, method=model.name, step=1, config={})
    with pytest.raises(InputError, match="preprocessing record"):
        load_model(bare)


def test_unsuitable_inputs(trained, lpba4mm):
    model = load_model(trained)
    f, m, _, _ = _pair(lpba4mm)
    g = f.grid
    crop = Image(
        f.data[:, 5:20, 5:25, 5:20].contiguous(),
        Grid((15, 20, 15), g.spacing, g.origin, g.direction),
        "crop",
    )
    assert "field of view" in model.unsuitable(crop, m)
    coarse = Image(f.data, Grid(g.shape, (9.0, 9.0, 9.0), g.origin, g.direction), "coarse")
    assert "coarser" in model.unsuitable(coarse, m)
    noisy = f.with_data(f.data + 0.5 * torch.rand_like(f.data))
    assert "skull-stripped" in model.unsuitable(f, noisy)


def test_register_cli_with_model(trained, lpba4mm, tmp_path):
    r = CliRunner()
    images, labels = lpba4mm / "images", lpba4mm / "labels"
    fixed, moving = str(images / "S01.nii.gz"), str(images / f"{HELD_OUT}.nii.gz")
    out = tmp_path / "out"
    res = r.invoke(
        app,
        [
            "register",
            fixed,
            moving,
            "-o",
            str(out),
            "--model",
            str(trained),
            "--refine",
            "5",
            "--fixed-labels",
            str(labels / "S01.nii.gz"),
            "--moving-labels",
            str(labels / f"{HELD_OUT}.nii.gz"),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    metrics = yaml.safe_load((out / "metrics.json").read_text())
    assert metrics["dice"] > metrics["dice_affine"]
    assert (out / "warp.nii.gz").is_file() and (out / "inverse_warp.nii.gz").is_file()
    # --refine needs a learned model; unknown --method names are refused
    res = r.invoke(
        app,
        [
            "register",
            fixed,
            moving,
            "-o",
            str(tmp_path / "x"),
            "--refine",
            "3",
            "--method",
            "classical",
        ],
    )
    assert isinstance(res.exception, InputError) and "--refine" in str(res.exception)
    assert not (tmp_path / "x").exists()
    res = r.invoke(app, ["register", fixed, moving, "-o", str(tmp_path / "y"), "--method", "nope"])
    assert isinstance(res.exception, InputError)
    assert "no pretrained model" in str(res.exception)


def test_auto_uses_classical_for_2d(data_root, tmp_path):
    """2D slices suit no shipped (3D) model: the default register says it went classical."""
    s = data_root / "ants2d"
    out = tmp_path / "o"
    res = CliRunner().invoke(
        app,
        [
            "register",
            str(s / "r16slice.jpg"),
            str(s / "r64slice.jpg"),
            "-o",
            str(out),
            "--preset",
            "affine",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "classical" in res.output
    model, why = choose_model(read_image(s / "r16slice.jpg"), read_image(s / "r64slice.jpg"))
    assert model is None and why.startswith("using classical registration (no pretrained model")


def _shipped(name: str):
    """A shipped model's name as a test parameter: the one ``auto`` tries first in the fast
    run, the others (a 1 mm pair each, ~40 s on a loaded core) marked slow."""
    return name if name == AUTO_ORDER[0] else pytest.param(name, marks=pytest.mark.slow)


@pytest.mark.parametrize("name", [_shipped(n) for n in available_models()])
def test_shipped_model_on_held_out_subject(lpba, name):
    """Every shipped model registers a pair of LPBA40 validation subjects (never trained on)
    like those it was trained on: S01 ← S35 for the atlas models, S36 ← S35 for the
    subject-to-subject one. Dice above the affine by a margin an untrained network cannot
    reach, no folds (the unsupervised model, after its 900 CPU steps, measured +0.028)."""
    margin = {"lpba40-vxm-unsup": 0.015}
    model = load_model(name)
    fixed = "S01" if model.atlas is not None else "S36"  # every atlas model's is S01
    f = read_image(lpba / "images" / f"{fixed}.nii.gz")
    m = read_image(lpba / "images" / "S35.nii.gz")
    fl = read_labels(lpba / "labels" / f"{fixed}.nii.gz")
    ml = read_labels(lpba / "labels" / "S35.nii.gz")
    assert model.unsuitable(f, m) is None, name
    result = predict(f, m, model)
    affine = resample(ml, f.grid, result.linear(), mode="label")
    before = mean_dice(fl.data[0], affine.data[0])
    after = mean_dice(fl.data[0], result.warp(ml, mode="label").data[0])
    assert after > before + margin.get(name, 0.04), (name, before, after)
    assert jacobian_stats(result.deformable.voxel_field())["folding_count"] == 0


@pytest.mark.skipif(not available_models(), reason="no shipped model installed")
def test_auto_picks_the_model_trained_for_the_pair(lpba):
    """``auto`` takes an atlas model only when the fixed image is its atlas; another pair of
    brains is registered classically (the subject-to-subject model scores lower), and
    naming that model uses it."""
    s01, s35, s36 = (read_image(lpba / "images" / f"{s}.nii.gz") for s in ("S01", "S35", "S36"))
    model, why = choose_model(s01, s35)
    assert model is not None and model.atlas["name"].startswith("S01"), why
    model, why = choose_model(s36, s35)
    assert model is None and "not that image" in why, why
    if "lpba40-vxm-pairs" in available_models():
        model, why = choose_model(s36, s35, method="lpba40-vxm-pairs")
        assert model is not None and model.atlas is None and "warning" not in why, why
