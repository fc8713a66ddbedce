"""Miao et al. 2016 (PEHL): pose conventions, the hierarchical zone-wise regression and its
weighted parameter loss, clear errors, and brief training on DRRs of real LPBA40 volumes
(4 mm; MRI as the attenuation map) at known random poses, scored on poses of validation
subjects S35 and S36 never trained on."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.io.images import read_image
from learnreg.methods.base import RegistrationBatch
from learnreg.methods.miao import GROUPS, MiaoPEHL, pose_errors, pose_matrix, random_poses
from learnreg.methods.registry import create_method, method_info
from learnreg.spatial.affine import AffineTransform

GRID = Grid((40, 48, 40), (4.0, 4.0, 4.0))  # LPBA40 at 4 mm
FAST = {"samples": 40, "depth": 220.0, "train_iterations": 1}
RANGES = (10.0, 10.0, 20.0, 6.0, 6.0, 6.0)  # true poses: ± mm, mm, mm, °, °, °


@pytest.fixture(scope="module")
def volumes(lpba) -> dict[str, torch.Tensor]:
    """S11–S16 (training) and S35, S36 (validation), area-averaged to 4 mm, mean-normalized."""
    out = {}
    for n in ("S11", "S12", "S13", "S14", "S15", "S16", "S35", "S36"):
        x = F.avg_pool3d(read_image(lpba / f"images/{n}.nii.gz").data[None].float(), 4)[0]
        out[n] = x / x.mean()
    return out


def _pairs(m: MiaoPEHL, vols: list[torch.Tensor], n: int, gen: torch.Generator):
    """``n`` X-rays: DRRs of random volumes of ``vols`` at random poses in RANGES."""
    idx = torch.randint(len(vols), (n,), generator=gen)
    moving = torch.stack([vols[i] for i in idx])
    target = random_poses(n, RANGES, gen)
    with torch.no_grad():
        xray = m.render(moving, GRID, target)
    return RegistrationBatch(xray, moving, target=target, grid=GRID)


# ---------------------------------------------------------------------------- conventions
def test_registered_with_table_attributes_and_config():
    info = method_info("pehl")
    assert info.name == "miao-pehl" and info.year == 2016 and info.ndim == "2D/3D"
    assert info.supervision == "supervised" and info.transform == "rigid"
    m = create_method("miao", zones=[3, 3], patch=8)
    assert type(m)(**m.config).config == m.config
    assert len(m.regressors) == 9 and len(m.regressors[0]) == len(GROUPS)


def test_pose_parameters_move_the_volume_as_named():
    m = MiaoPEHL()
    geo, c = m.geometry, torch.tensor(GRID.center, dtype=torch.float64)
    zero = pose_matrix(torch.zeros(1, 6, dtype=torch.float64), geo, GRID.center)
    torch.testing.assert_close(zero[0], torch.eye(4, dtype=torch.float64))
    # t_u, t_v along the detector axes (world 0 and 2), t_beam along the beam (world 1)
    p = torch.tensor([[1.0, 2.0, 3.0, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(
        pose_matrix(p, geo, GRID.center)[0, :3, 3], torch.tensor([1.0, 3.0, 2.0]).double()
    )
    # θ rotates about the beam axis, about the isocentre; α about u, β about v
    for col, axis in ((3, 1), (4, 0), (5, 2)):
        p = torch.zeros(1, 6, dtype=torch.float64)
        p[0, col] = 30.0
        mat = pose_matrix(p, geo, GRID.center)[0]
        assert torch.allclose(
            mat[:3, :3] @ torch.eye(3, dtype=torch.float64)[axis],
            torch.eye(3, dtype=torch.float64)[axis],
        )
        torch.testing.assert_close(mat[:3, :3] @ c + mat[:3, 3], c)
        assert math.isclose(float(torch.arccos((mat[:3, :3].trace() - 1) / 2)), math.radians(30))
    # errors: a pure 5 mm shift gives mTRE = translation = 5 mm, rotation 0
    pts = GRID.index_to_world(GRID.index_lattice(3, torch.float64))
    a = pose_matrix(torch.tensor([[0, 0, 0, 4.0, -2.0, 1.0]]).double(), geo, GRID.center)
    b = pose_matrix(torch.tensor([[3.0, 4.0, 0, 4.0, -2.0, 1.0]]).double(), geo, GRID.center)
    err = pose_errors(a, b, pts)
    for k, v in (("mtre", 5.0), ("translation", 5.0), ("rotation", 0.0)):
        assert abs(float(err[k][0]) - v) < 1e-3, (k, err[k])  # arccos near 1: ~1e-4°


def test_forward_is_rigid_and_renders_the_final_pose(volumes):
    m = MiaoPEHL(**FAST, iterations=2)
    b = _pairs(m, [volumes["S11"]], 2, torch.Generator().manual_seed(0))
    out = m.predict(b.fixed, b.moving, GRID)
    assert isinstance(out.transform, AffineTransform) and out.grid == GRID
    lin = out.transform.homogeneous()[:, :3, :3]
    torch.testing.assert_close(lin @ lin.transpose(1, 2), torch.eye(3).expand(2, 3, 3))
    assert out.extras["drr"].shape == b.fixed.shape and out.warped.shape == b.moving.shape
    assert len(out.extras["steps"]) == 2 * len(GROUPS)
    # untrained: zero-initialized heads predict no update, the identity pose
    torch.testing.assert_close(out.extras["params"], torch.zeros(2, 6))
    torch.testing.assert_close(out.extras["drr"], m.render(b.moving, GRID, torch.zeros(2, 6)))
    with pytest.raises(InputError, match="fixed must be the X-ray"):
        m(b.moving, b.moving, GRID)
    with pytest.raises(InputError, match="moving must be the 3D volume"):
        m(b.fixed, b.fixed, GRID)
    with pytest.raises(InputError, match="must be the volume's"):
        m(b.fixed, b.moving, Grid((8, 8, 8)))
    with pytest.raises(ValueError, match="supervised: the batch needs `target`"):
        m.loss(RegistrationBatch(b.fixed, b.moving, grid=GRID), out)
    with pytest.raises(ValueError, match="zones must be two positive counts"):
        MiaoPEHL(zones=(0, 2))
    with pytest.raises(ValueError, match="detector needs 2 sizes"):
        MiaoPEHL(detector=(32,))


def test_loss_is_the_weighted_parameter_mse_of_every_step(volumes):
    m = MiaoPEHL(**FAST)
    b = _pairs(m, [volumes["S12"]], 3, torch.Generator().manual_seed(1))
    m.train()
    w = m.weights
    zero = m.loss(b, m(b.fixed, b.moving, GRID))  # untrained: every delta is 0
    want = torch.stack([(b.target[:, list(g)] / w[list(g)]).square().mean() for g in GROUPS])
    torch.testing.assert_close(zero["total"], want.mean())
    # heads that output the residual exactly (one pass from the identity): zero loss
    target = b.target[:1].expand(3, 6).clone()
    batch = RegistrationBatch(b.fixed, b.moving, target=target, grid=GRID)
    with torch.no_grad():
        for g, cols in enumerate(GROUPS):
            m.regressors[0][g].head.out.bias.copy_(target[0, list(cols)])
    terms = m.loss(batch, m(b.fixed, b.moving, GRID))
    assert float(terms["total"].detach()) < 1e-10 and float(terms["mtre"]) < 1e-3


def test_zones_route_each_sample_to_its_own_regressors(volumes):
    """Three zones along α (20° wide, centred on 0): an out-of-plane step of +25° puts the
    second pass in zone (2, 0), whose regressors alone get the gradient of that pass."""
    m = MiaoPEHL(**{**FAST, "train_iterations": 2}, zones=(3, 1), zone_width=20.0)
    alpha = torch.tensor([[-25.0, 0.0], [-5.0, 0.0], [5.0, 0.0], [25.0, 0.0], [31.0, 40.0]])
    zones = m.zone_of(torch.cat([torch.zeros(5, 4), alpha], 1))
    assert zones.tolist() == [0, 1, 1, 2, 2]
    with torch.no_grad():
        m.regressors[1][1].head.out.bias.copy_(torch.tensor([25.0, 0.0]))
    b = _pairs(m, [volumes["S13"]], 2, torch.Generator().manual_seed(2))
    m.train()
    m.loss(b, m(b.fixed, b.moving, GRID))["total"].backward()

    def moved(zone: int) -> bool:
        return any(
            p.grad is not None and bool(p.grad.abs().sum() > 0)
            for p in m.regressors[zone].parameters()
        )

    assert moved(1) and moved(2) and not moved(0)


# ---------------------------------------------------------------------------- training
def train_and_score(volumes, seed: int = 0, steps: int = 200) -> dict[str, float]:
    """``steps`` steps of 6 DRRs of S11–S16 at random poses in RANGES (one hierarchy pass per
    step, Adam 2e-3; ``seed`` of the weights and the data); the mean mTRE (mm) and rotation
    error (degrees) of the three-pass registration of 16 X-rays of S35/S36 at random poses,
    and of the untrained model (the identity start)."""
    torch.manual_seed(seed)
    m = MiaoPEHL(**FAST)
    gen = torch.Generator().manual_seed(seed)
    train = [volumes[f"S1{i}"] for i in range(1, 7)]
    test = _pairs(m, [volumes["S35"], volumes["S36"]], 16, torch.Generator().manual_seed(99))
    untrained = m.predict(test.fixed, test.moving, GRID)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    m.train()
    for _ in range(steps):
        b = _pairs(m, train, 6, gen)
        terms = m.loss(b, m(b.fixed, b.moving, GRID))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    out = m.predict(test.fixed, test.moving, GRID)
    pts = GRID.index_to_world(GRID.index_lattice(5, torch.float64))
    true = m.pose(test.target.double(), GRID)
    e = pose_errors(out.transform.homogeneous(), true, pts)
    e0 = pose_errors(untrained.transform.homogeneous(), true, pts)
    return {
        "mtre": float(e["mtre"].mean()),
        "mtre0": float(e0["mtre"].mean()),
        "rotation": float(e["rotation"].mean()),
        "rotation0": float(e0["rotation"].mean()),
    }


def test_training_on_drrs_of_known_poses_beats_the_initial_pose(volumes):
    """200 steps of 6 DRRs of S11–S16 at random poses (±10, ±10, ±20 mm; ±6° per axis),
    one hierarchy pass per step; registered with three passes, the X-rays of 16 random poses
    of S35/S36 (validation subjects, never trained on) are far closer than the start (the
    identity, which is also what the untrained, zero-initialized regressors return)."""
    r = train_and_score(volumes)
    print(
        f"mTRE {r['mtre0']:.2f} -> {r['mtre']:.2f} mm, rotation {r['rotation0']:.2f} -> "
        f"{r['rotation']:.2f} deg"
    )
    # measured (1 thread; seeds 0 / 1 / 2 of weights and data): mTRE 15.80 -> 0.92 / 1.32 /
    # 2.13 mm (ratio <= 0.14), rotation 4.94 -> 0.51 / 0.80 / 1.14 deg (ratio <= 0.23); 100
    # steps are not enough (seed 0: 13.2 mm)
    assert r["mtre"] < 0.3 * r["mtre0"]
    assert r["rotation"] < 0.5 * r["rotation0"]


# ---------------------------------------------------------------------------- command line
CLI_POSES = torch.tensor(  # known poses of the validation X-rays (mm, mm, mm, °, °, °)
    [[6.0, -5.0, 12.0, 4.0, -3.0, 3.0], [-7.0, 4.0, -10.0, -3.0, 4.0, -4.0]]
)


def _cli_config(data_root, steps: int, seed: int) -> dict:
    """`learnreg train` of miao-pehl on DRRs of LPBA40 S11–S16 at 8 mm (the ``drr`` source;
    one hierarchy pass per step), validated on S35."""
    geometry = {"samples": 40, "depth": 330.0}
    return {
        "method": "miao-pehl",
        "method_config": {**geometry, "train_iterations": 1},
        "data": {
            "spacing": [8, 8, 8],
            "synthetic": {
                "kind": "drr",
                "images": str(data_root / "lpba40" / "images"),
                "train": [f"S1{i}" for i in range(1, 7)],
                "val": ["S35"],
                **geometry,
                "ranges": list(RANGES),
                "length": 6 * steps,
                "val_length": 4,
                "seed": seed,
            },
        },
        "optimizer": {"lr": 2e-3},
        "steps": steps,
        "batch_size": 6,
        "val_every": steps,
        "checkpoint_every": steps,
        "seed": seed,
    }


def _register_known_poses(data_root, checkpoint, folder) -> dict[str, float]:
    """`learnreg register --model` X-rays of S35 and S36 (validation subjects) rendered at
    CLI_POSES by the trained model's own projector; checks each written ``affine.mat`` (read
    by SimpleITK) against the pose the model predicts through the Python API (1e-4), and
    returns the mean mTRE (mm) of the written poses and of the identity."""
    import SimpleITK as sitk

    from learnreg.io.images import write_image
    from learnreg.zoo.models import load_model
    from learnreg.zoo.projection import predict_pose

    from ._roundtrip import _sitk_ras_matrix, invoke

    model = load_model(checkpoint)
    err, err0 = [], []
    for subject in ("S35", "S36"):
        path = data_root / "lpba40" / "images" / f"{subject}.nii.gz"
        volume = read_image(path)
        grid = model.grid_for(volume)
        v = model.preprocessor.image(volume, grid).batch()
        pts = grid.index_to_world(grid.index_lattice(5, torch.float64))
        for k, params in enumerate(CLI_POSES):
            xray = model.method.render(v, grid, params[None])[0]
            det = Grid(model.method.geometry.detector, model.method.geometry.pixel_spacing[:2])
            xray_path = folder / f"{subject}_{k}.nii.gz"
            write_image(Image(xray, det, "xray"), xray_path)
            out = folder / f"{subject}_{k}"
            invoke("register", xray_path, path, "-o", out, "--model", checkpoint, "-q")
            written = _sitk_ras_matrix(sitk.ReadTransform(str(out / "affine.mat")), 3)
            predicted = predict_pose(read_image(xray_path), volume, model).pose.homogeneous()[0]
            assert abs(written - predicted.double().numpy()).max() < 1e-4
            drr = read_image(out / "drr.nii.gz").data
            want = model.method.render(
                v,
                grid,
                torch.tensor(
                    [json.loads((out / "result.json").read_text())["info"]["pose_parameters"]]
                ),
            )[0]
            torch.testing.assert_close(drr, want, atol=1e-3, rtol=1e-4)
            true = model.method.pose(params[None].double(), grid)
            e = pose_errors(torch.from_numpy(written)[None], true, pts)["mtre"]
            e0 = pose_errors(torch.eye(4, dtype=torch.float64)[None], true, pts)["mtre"]
            err.append(float(e[0]))
            err0.append(float(e0[0]))
    return {"mtre": sum(err) / len(err), "mtre0": sum(err0) / len(err0)}


def test_cli_train_then_register_an_xray_writes_the_predicted_pose(data_root, tmp_path):
    """`learnreg train` (the ``drr`` source, 4 steps) then `learnreg register XRAY.nii.gz
    VOLUME.nii.gz --model`: the written affine.mat, read by SimpleITK, is the pose the model
    predicts, and the written DRR is the projection at it."""
    from ._roundtrip import train

    r = _register_known_poses(
        data_root, train(_cli_config(data_root, 4, 0), tmp_path / "t"), tmp_path
    )
    assert r["mtre0"] > 10.0  # the known poses are far from the identity
    assert abs(r["mtre"] - r["mtre0"]) > 1e-3  # 4 steps moved the pose off the identity


def test_cli_refuses_mismatched_pairs_with_clear_errors(data_root, tmp_path):
    """A 2D/3D pair without a projection model gets the usual dimensionality error; with the
    miao-pehl checkpoint, a swapped pair (volume as fixed) or options that do not apply are
    named."""
    from typer.testing import CliRunner

    from learnreg.cli.main import app
    from learnreg.io.images import write_image

    from ._roundtrip import train

    ckpt = train(_cli_config(data_root, 1, 0), tmp_path / "t")
    xray = write_image(
        Image(torch.rand(1, 32, 32), Grid((32, 32), (8.0, 8.0)), "x"), tmp_path / "x.nii.gz"
    )
    volume = data_root / "lpba40" / "images" / "S35.nii.gz"

    def fails(*args) -> str:
        r = CliRunner().invoke(app, ["register", *map(str, args)])
        assert r.exit_code != 0 and isinstance(r.exception, InputError), r.output
        return str(r.exception)

    assert "same dimensionality" in fails(
        xray, volume, "-o", tmp_path / "a", "--method", "classical"
    )
    assert "fixed X-ray must be 2D" in fails(volume, xray, "-o", tmp_path / "b", "--model", ckpt)
    assert "takes no refine" in fails(
        xray, volume, "-o", tmp_path / "c", "--model", ckpt, "--refine", "3"
    )


def cli_pose_error(data_root, folder, seed: int, steps: int = 400) -> dict[str, float]:
    """Mean mTRE (mm) of the CLI-registered validation X-rays after `learnreg train` of
    ``steps`` steps with ``seed`` (weights and data), and of the identity."""
    from ._roundtrip import train

    return _register_known_poses(
        data_root, train(_cli_config(data_root, steps, seed), folder / "t"), folder
    )


@pytest.mark.slow
def test_cli_trained_model_registers_validation_xrays_far_better_than_the_identity(
    data_root, tmp_path
):
    """400 steps of `learnreg train` on DRRs of S11–S16 at 8 mm; the poses `learnreg register`
    writes for X-rays of S35/S36 (validation subjects, never trained on) at known poses are far
    closer to the truth than the identity (what the untrained model returns)."""
    r = cli_pose_error(data_root, tmp_path, 0)
    print(f"mTRE identity {r['mtre0']:.2f} -> registered {r['mtre']:.2f} mm")
    # measured (1 thread; seeds 0 / 1 / 2 of weights and data, ~50 s each): mTRE 17.38 ->
    # 1.76 / 2.22 / 2.90 mm (ratio <= 0.17); 150 steps are not enough (seed 0: 9.99 mm)
    assert r["mtre"] < 0.4 * r["mtre0"]
