"""TPS regression (Eppenhof et al. 2018): control-grid displacements from LPBA40 volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.data.datasets import collate_pairs
from learnreg.data.random_warps import RandomWarpPairs, lpba_volumes, tps_points
from learnreg.methods.registry import create_method, method_info
from learnreg.methods.tps_regression import (
    ControlGridSpline,
    TPSGrid,
    TPSRegression,
    control_point_error,
    tps_basis,
)
from learnreg.spatial.frame import GridFrame
from learnreg.spatial.sampling import warp
from learnreg.spatial.tps import ThinPlateSpline

SHAPE = (20, 24, 20)  # LPBA40 at 8 mm
SMALL = {"shape": SHAPE, "grid_size": 6, "features": (8, 16, 16, 32), "downsample_after": (1,)}


@pytest.fixture(scope="module")
def volumes():
    return lpba_volumes(["S11", "S12", "S13", "S14"], 8), lpba_volumes(["S35", "S36"], 8)


def test_registered_with_table_attributes() -> None:
    info = method_info("eppenhof")
    assert info.name == "tps-regression" and info.cls is TPSRegression and info.year == 2018
    assert "thin-plate" in info.transform and "supervised" in info.supervision


def test_tps_basis_reproduces_spatial_thin_plate_spline() -> None:
    """The method's linear TPS operator against skimage's thin-plate spline (2D) and
    learnreg.spatial.tps via the data module (3D)."""
    skimage = pytest.importorskip("skimage")
    from skimage.transform import ThinPlateSplineTransform

    g = torch.Generator().manual_seed(0)
    cp = Grid((30, 40)).index_lattice(3, torch.float64)
    torch.testing.assert_close(cp, TPSGrid((30, 40), 3).control.double())
    v = torch.randn(9, 2, generator=g, dtype=torch.float64)
    pts = torch.rand(25, 2, generator=g, dtype=torch.float64) * 29
    if hasattr(ThinPlateSplineTransform, "from_estimate"):
        ref = ThinPlateSplineTransform.from_estimate(cp.numpy(), (cp + v).numpy())
    else:  # pragma: no cover - scikit-image < 0.26
        ref = ThinPlateSplineTransform()
        ref.estimate(cp.numpy(), (cp + v).numpy())
    ours = (pts + tps_basis(cp, pts) @ v).numpy()
    np.testing.assert_allclose(ours, ref(pts.numpy()), atol=1e-5)
    assert skimage is not None
    # rows sum to one and affine functions are reproduced
    b = tps_basis(cp, pts)
    torch.testing.assert_close(b.sum(1), torch.ones(25, dtype=torch.float64))
    torch.testing.assert_close(
        b @ (cp @ torch.tensor([[2.0], [-1.0]], dtype=torch.float64)),
        pts @ torch.tensor([[2.0], [-1.0]], dtype=torch.float64),
    )
    # 3D dense field vs the data module's (spatial.tps.ThinPlateSpline) map
    grid = TPSGrid((6, 7, 5), 3)
    d = torch.randn(2, 27, 3, generator=g)
    x = Grid((6, 7, 5)).index_points(torch.float64).reshape(1, -1, 3)
    ref3 = tps_points(d.double(), (6, 7, 5), 3, x) - x
    torch.testing.assert_close(
        grid.dense(d).flatten(2).transpose(1, 2).double(), ref3, atol=1e-4, rtol=1e-4
    )


def test_transform_maps_world_points_as_its_dense_field() -> None:
    """The output transform is the thin-plate spline in the network grid's index frame: its
    displacement on that grid is the fast design-matrix field, and on arbitrary world points
    (between voxels, outside the grid) it is ``ThinPlateSpline`` through the control grid."""
    g = torch.Generator().manual_seed(1)
    tps = TPSGrid((9, 11, 8), 3)
    delta = torch.randn(2, 27, 3, generator=g)
    grid = Grid((9, 11, 8), (3.0, 2.5, 4.0), (-12.0, 30.0, 5.0), ((0, -1, 0), (1, 0, 0), (0, 0, 1)))
    t = tps.transform(delta, grid)
    assert isinstance(t, GridFrame) and isinstance(t.inner, ControlGridSpline)
    assert t.batch_size == 2
    torch.testing.assert_close(t.voxel_displacement(grid), tps.dense(delta))
    slow = ThinPlateSpline.voxel_displacement(t.inner, Grid(grid.shape))  # kernel, no design
    torch.testing.assert_close(slow, tps.dense(delta), atol=1e-4, rtol=1e-4)
    idx = torch.rand(2, 50, 3, generator=g, dtype=torch.float64) * 14 - 2  # also outside
    cp = grid.index_lattice(3, torch.float64)
    ref = ThinPlateSpline(cp[None], cp[None] + delta.double())(idx)
    mapped = t(grid.index_to_world(idx))
    torch.testing.assert_close(grid.world_to_index(mapped), ref, atol=1e-6, rtol=0)
    # the inverse is the iterative inverse of the dense field on the grid
    pts = grid.world_points(torch.float64)[2:6, 3:7, 2:5].reshape(1, -1, 3).expand(2, -1, -1)
    small = tps.transform(0.3 * delta, grid)  # a smooth, invertible spline
    back = grid.world_to_index(small.inverse()(small(pts)))
    err = (back - grid.world_to_index(pts)).abs()  # voxels: interpolation of the dense inverse
    assert float(err.mean()) < 0.02 and float(err.max()) < 0.25


def test_control_point_error() -> None:
    p = torch.zeros(1, 2, 3)
    t = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]])
    torch.testing.assert_close(control_point_error(p, t), torch.tensor([3.0]))
    with pytest.raises(ValueError, match=r"\(N, K, D\)"):
        control_point_error(p, t[:, :1])


@pytest.mark.parametrize("head", ["conv", "fc"])
def test_forward_shapes_identity_start_and_true_warp(head, volumes) -> None:
    ds = RandomWarpPairs(volumes[1], "tps", None, 2, grid_size=6, magnitude=2.0, seed=3)
    b = collate_pairs([ds[0], ds[1]])
    m = create_method("tps-regression", head=head, **SMALL)
    out = m.predict(b.fixed, b.moving)
    assert out.displacement.shape == (2, 3, *SHAPE) and out.extras["control"].shape == (2, 216, 3)
    assert out.displacement.abs().max() < 0.5
    assert type(m)(**m.config).config == m.config and m.input_shape == SHAPE
    err = m.transform_error(b, out)
    torch.testing.assert_close(err, control_point_error(out.extras["control"], b.target))
    assert set(m.validate(b, out)) == {"error"}
    # the true control displacements warp moving onto fixed
    warped = warp(b.moving, m.tps.dense(b.target))
    assert (warped - b.fixed).abs().mean() < 0.2 * (b.moving - b.fixed).abs().mean()
    losses = m.loss(b, out)
    torch.testing.assert_close(
        losses["mse"], (out.extras["control"] - b.target).square().mean(), rtol=1e-5, atol=1e-6
    )
    dense = create_method("tps-regression", head=head, loss="dense", **SMALL)
    assert float(dense.loss(b, dense(b.fixed, b.moving))["total"].detach()) > 0
    # 2D works too
    m2 = TPSRegression(2, (32, 32), 4, (4, 8), (0, 1), head=head)
    assert m2(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)).extras["control"].shape == (
        1,
        16,
        2,
    )


def test_bad_inputs_raise_value_error(volumes) -> None:
    m = create_method("tps-regression", **SMALL)
    x = torch.zeros(1, 1, *SHAPE)
    with pytest.raises(ValueError, match=r"\(N, 1, 20, 24, 20\)"):
        m(x[..., :10], x[..., :10])
    out = m(x, x)
    with pytest.raises(ValueError, match="supervised"):
        m.loss(collate_pairs([{"fixed": x[0], "moving": x[0]}]), out)
    bad = collate_pairs([{"fixed": x[0], "moving": x[0], "target": torch.zeros(27, 3)}])
    with pytest.raises(ValueError, match=r"\(N, 216, 3\)"):
        m.loss(bad, out)
    with pytest.raises(ValueError, match="head"):
        create_method("tps-regression", head="mlp")
    with pytest.raises(ValueError, match="grid_size"):
        create_method("tps-regression", grid_size=1)


def _brain_endpoint_error(u: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> float:
    """Mean displacement-error norm (voxels) inside the brain, where the motion shows."""
    brain = ((moving > 0.05) | (fixed > 0.05)).float()
    return float((u.norm(dim=1, keepdim=True) * brain).sum() / brain.sum())


@pytest.mark.slow
def test_trains_below_the_identity_on_heldout_subjects(volumes) -> None:
    """Brief training (150 steps of 4) on random TPS warps of four LPBA40 subjects at 8 mm:
    the dense endpoint error inside the brain of two held-out subjects falls below the
    identity's. (The mean over all 216 control points barely moves this early: many lie in
    the background, where nothing in the images shows their motion.)"""
    warps = {"grid_size": 6, "magnitude": 2.0, "fixed_border": True}
    train = RandomWarpPairs(volumes[0], "tps", None, 10**6, seed=1, **warps)
    test = RandomWarpPairs(volumes[1], "tps", None, 32, seed=99, **warps)
    b = collate_pairs([test[i] for i in range(32)])
    torch.manual_seed(0)
    m = create_method("tps-regression", **SMALL)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    m.train()
    for s in range(150):
        batch = collate_pairs([train[s * 4 + i] for i in range(4)])
        loss = m.loss(batch, m(batch.fixed, batch.moving))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    true = m.tps.dense(b.target)
    with torch.no_grad():
        pred = m.predict(b.fixed, b.moving).displacement
    identity = _brain_endpoint_error(true, b.fixed, b.moving)
    after = _brain_endpoint_error(pred - true, b.fixed, b.moving)
    assert after < 0.9 * identity, f"{after:.3f} vs identity {identity:.3f} voxels"


# ---------------------------------------------------------------------------- issue 11 proof
def test_train_then_register_oblique_pair_replays_in_simpleitk(data_root, tmp_path):
    """Issue 11 proof: `learnreg train` a tiny TPS network on random TPS warps of LPBA40 at
    8 mm (on its physical RAS grid), `learnreg register --model` a pair of volumes given at
    another spacing and an oblique direction: the spline is written as a displacement field
    and its inverse that SimpleITK replays."""
    from learnreg.io.images import read_image
    from learnreg.train.checkpoint import load_checkpoint

    from ._roundtrip import oblique, register_and_replay, train

    config = {
        "method": "tps-regression",
        "method_config": {**SMALL, "shape": list(SHAPE), "features": [4, 8], "grid_size": 4},
        "data": {
            "synthetic": {
                "kind": "warp",
                "images": "lpba40",
                "transform": "tps",
                "subjects": ["S11", "S12"],
                "val_subjects": ["S35"],
                "grid_size": 4,
                "magnitude": 2.0,
                "fixed_border": True,
                "length": 16,
                "val_length": 2,
            }
        },
        "optimizer": {"lr": 1e-2},
        "steps": 6,
        "batch_size": 2,
        "val_every": 3,
    }
    ckpt = train(config, tmp_path / "train")
    extra = load_checkpoint(ckpt)["extra"]
    assert extra["grid"]["spacing"] == [8.0, 8.0, 8.0]
    assert extra["preprocess"]["network"]["spacing"] == [8.0, 8.0, 8.0]
    lpba = data_root / "lpba40" / "images"
    fixed = oblique(read_image(lpba / "S35.nii.gz"), (6.0, 7.0, 5.0), 15.0, "f")
    moving = oblique(read_image(lpba / "S36.nii.gz"), (5.0, 6.5, 7.5), -10.0, "m")
    report = register_and_replay(ckpt, fixed, moving, tmp_path / "out")
    assert report["manifest"]["info"]["transform"] == "GridFrame"
    assert {"warp", "inverse_warp"} <= set(report["manifest"]["files"])
    assert report["max_warp_mm"] > 0.05  # a predicted spline (mm), not the identity
    print(f"MAD {report['mad']:.2e}, max |u| {report['max_warp_mm']:.2f} mm")
