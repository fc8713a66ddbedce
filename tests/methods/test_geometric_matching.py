"""Geometric matching CNN (Rocco et al. 2017): affine and TPS regression from a correlation
volume, trained on random warps of real photographs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.data.datasets import collate_pairs
from learnreg.data.random_warps import RandomWarpPairs, affine_points
from learnreg.data.synthetic import photo_images
from learnreg.methods.geometric_matching import (
    GeometricMatching,
    GlobalTransformModel,
    affine_matrix,
    matrix_to_affine_params,
)
from learnreg.methods.registry import create_method, method_info
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.frame import GridFrame, index_matrix_to_world
from learnreg.spatial.sampling import sample_index, warp

S = 32
SMALL = {
    "shape": (S, S),
    "features": (16, 16, 32, 32),
    "downsample_after": (1, 3),
    "regression_features": (32, 16),
    "regression_kernels": (5, 3),
}
WARPS = {"rotation": 10.0, "translation": 3.0, "scale": 0.1, "shear": 0.05, "magnitude": 2.5}


@pytest.fixture(scope="module")
def photos():
    return photo_images("train", (72, 96)), photo_images("heldout", (72, 96))


def _heldout(photos, kind: str, n: int = 64, warps: dict = WARPS):
    ds = RandomWarpPairs(photos[1], kind, (S, S), n, seed=99, margin=8, **warps)
    return ds, collate_pairs([ds[i] for i in range(n)])


def test_registered_with_table_attributes() -> None:
    info = method_info("rocco")
    assert info.name == "geometric-matching" and info.year == 2017 and info.cls is GeometricMatching
    assert "supervised" in info.supervision and "grid" in info.loss
    assert "thin-plate" in info.transform and info.ndim == "2D/3D"


def test_affine_parameters_roundtrip_and_dense_field() -> None:
    g = torch.Generator().manual_seed(0)
    p = 0.1 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    m = affine_matrix(p, (20, 30))
    torch.testing.assert_close(matrix_to_affine_params(m, (20, 30)), p)
    p3 = 0.1 * torch.randn(2, 12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(matrix_to_affine_params(affine_matrix(p3, (5, 6, 7)), (5, 6, 7)), p3)
    model = GlobalTransformModel((20, 30), "affine").double()
    # the dense field at every voxel is T(x) − x of the data module's (independent) map
    u = model.dense(p)  # from the world transform (float32 grid points)
    x = Grid((20, 30)).index_points(torch.float64).reshape(1, -1, 2)
    ref = affine_points(p, (20, 30), x) - x
    torch.testing.assert_close(u.flatten(2).transpose(1, 2).double(), ref, atol=2e-5, rtol=0)


def test_grid_loss_of_a_translation() -> None:
    model = GlobalTransformModel((21, 41), "affine", loss_points=20)
    t = torch.zeros(1, 6)
    t[0, 2], t[0, 5] = 3.0, 4.0  # translation (3, 4) voxels
    terms = model.grid_loss(torch.zeros(1, 6), t)
    torch.testing.assert_close(terms["grid_error"], torch.tensor(5.0))
    # Rocco's loss: squared distance in normalized coordinates (half extents 10 and 20)
    torch.testing.assert_close(terms["grid_loss"], torch.tensor(0.3**2 + 0.2**2))
    assert float(model.grid_loss(t, t)["grid_loss"]) == 0.0
    tps = GlobalTransformModel((21, 41), "tps", grid_size=3)
    d = torch.zeros(1, 9, 2)
    d[..., 0] = 2.0  # every control point moved by 2 voxels along axis 0: a translation
    torch.testing.assert_close(
        tps.grid_loss(torch.zeros_like(d), d)["grid_error"], torch.tensor(2.0)
    )


@pytest.mark.parametrize("kind", ["affine", "tps"])
def test_true_parameters_warp_moving_onto_fixed(kind, photos) -> None:
    """The data's target, through the method's dense field, maps moving onto fixed."""
    ds, b = _heldout(photos, kind, 4)
    m = create_method("geometric-matching", transform=kind, **SMALL)
    u = m.model.dense(b.target)
    warped = warp(b.moving, u)
    x = Grid((S, S)).index_points().movedim(-1, 0)
    inside = ((x + u >= 0) & (x + u <= S - 1)).all(1, keepdim=True)
    err = (warped - b.fixed).abs()[inside].mean()
    assert err < 0.2 * (b.moving - b.fixed).abs()[inside].mean()
    # and sampling the moving crop directly at T(x) gives the same image
    t = (x + u).movedim(1, -1)
    torch.testing.assert_close(sample_index(b.moving, t), warped, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["affine", "tps"])
def test_forward_2d_and_3d_shapes_start_at_identity(kind, photos) -> None:
    _, b = _heldout(photos, kind, 3)
    m = create_method("geometric-matching", transform=kind, **SMALL)
    out = m.predict(b.fixed, b.moving)
    assert out.displacement.shape == (3, 2, S, S) and out.warped.shape == (3, 1, S, S)
    assert out.extras["params"].shape == ((3, 6) if kind == "affine" else (3, 9, 2))
    assert out.displacement.abs().max() < 0.5
    assert type(m)(**m.config).config == m.config and m.input_shape == (S, S)
    m3 = GeometricMatching(
        ndim=3,
        transform=kind,
        shape=(16, 16, 16),
        features=(4, 8),
        downsample_after=(0, 1),
        regression_features=(8, 8),
        regression_kernels=(3, 1),
        grid_size=3,
    )
    x = torch.rand(2, 1, 16, 16, 16)
    out3 = m3(x, x.flip(2))
    assert out3.displacement.shape == (2, 3, 16, 16, 16)
    assert out3.extras["params"].shape == ((2, 12) if kind == "affine" else (2, 27, 3))
    target = torch.zeros_like(out3.extras["params"])
    loss = m3.loss(type(b)(x, x, target=target), out3)
    loss["total"].backward()
    assert m3.tower.layers[0].conv.weight.grad is not None


@pytest.mark.parametrize("kind", ["affine", "tps"])
def test_transform_is_world_space_on_the_network_grid(kind, photos) -> None:
    """On an oblique physical grid: the affine is ``G M G⁻¹`` (an ``AffineTransform``, saved
    as an ITK matrix), the TPS is the spline in the grid's index frame; both map world
    points as the dense field says, and the validation error is the grid error."""
    _, b = _heldout(photos, kind, 3)
    torch.manual_seed(0)
    m = create_method("geometric-matching", transform=kind, **SMALL)
    with torch.no_grad():
        m.regressor.fc.bias.normal_(0.0, 0.5)  # a visible transform
    c, s_ = np.cos(0.3), np.sin(0.3)
    grid = Grid((S, S), (1.5, 0.6), (30.0, -4.0), ((c, s_), (-s_, c)))
    out = m.predict(b.fixed, b.moving, grid)
    unit = m.predict(b.fixed, b.moving)
    assert out.displacement.abs().max() > 0.3
    torch.testing.assert_close(out.displacement, unit.displacement, atol=1e-4, rtol=0)
    if kind == "affine":
        assert isinstance(out.transform, AffineTransform)
        want = index_matrix_to_world(out.extras["matrix"].double(), grid)
        torch.testing.assert_close(out.transform.homogeneous().double(), want, atol=1e-5, rtol=0)
    else:
        assert isinstance(out.transform, GridFrame)
    world = grid.world_points(torch.float64).reshape(1, -1, 2).expand(3, -1, -1)
    mapped = grid.world_to_index(out.transform(world.float()).double())
    index = grid.index_points(torch.float64).reshape(1, -1, 2)
    field = out.displacement.flatten(2).transpose(1, 2).double()
    torch.testing.assert_close(mapped - index, field, atol=1e-3, rtol=0)
    batch = type(b)(b.fixed, b.moving, target=b.target, grid=grid)
    err = m.transform_error(batch, out)
    assert err.shape == (3,)
    torch.testing.assert_close(err.mean(), m.loss(batch, out)["grid_error"])
    assert set(m.validate(batch, out)) == {"error"}


def test_bad_inputs_raise_value_error(photos) -> None:
    _, b = _heldout(photos, "affine", 2)
    m = create_method("geometric-matching", **SMALL)
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        m(b.fixed[..., :16], b.moving[..., :16])
    out = m(b.fixed, b.moving)
    with pytest.raises(ValueError, match="supervised"):
        m.loss(type(b)(b.fixed, b.moving), out)
    with pytest.raises(ValueError, match="target must be"):
        m.loss(type(b)(b.fixed, b.moving, target=torch.zeros(2, 9, 2)), out)
    with pytest.raises(ValueError, match="transform must be"):
        create_method("geometric-matching", transform="bspline")
    with pytest.raises(ValueError, match="do not fit"):
        create_method("geometric-matching", **{**SMALL, "regression_kernels": (7, 5)})


def _chain(seed: int = 0) -> GeometricMatching:
    torch.manual_seed(seed)
    m = create_method("geometric-matching", transform="affine+tps", **SMALL).eval()
    with torch.no_grad():
        for stage in m.stages.values():
            stage.regressor.fc.weight.normal_(0, 0.05)
    return m


def test_chain_maps_through_the_spline_then_the_affine(photos) -> None:
    """Rocco's chain: φ(x) = A(S(x)), S from the TPS network on the affinely warped moving
    image; checked against the affine matrix and the spline's dense field."""
    ds, b = _heldout(photos, "affine+tps", n=2)
    m = _chain()
    out = m.predict(b.fixed, b.moving)
    pa, pt = out.extras["affine_params"], out.extras["tps_params"]
    assert out.extras["params"].shape == (2, 6 + 18)
    assert float(pa.abs().max()) > 1e-3 and float(pt.abs().max()) > 1e-3
    # the TPS stage saw the moving image warped by the affine stage
    second = m.stages["tps"].predict(b.fixed, out.extras["warped_affine"])
    torch.testing.assert_close(second.extras["params"], pt)
    x = Grid((S, S)).index_points().reshape(-1, 2)
    spline = m.stages["tps"].model.dense(pt).flatten(2).transpose(1, 2) + x
    mat = affine_matrix(pa, (S, S))
    want = spline @ mat[:, :2, :2].transpose(1, 2) + mat[:, None, :2, 2] - x
    got = out.displacement.flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # its loss grid is the data's composite warp of the same parameters
    pts = m.stages["affine"].model.points
    torch.testing.assert_close(
        m.chain_points(b.target).double(),
        ds.transform_points(b.target.double(), pts[None]),
        atol=1e-4,
        rtol=0,
    )
    terms = m.loss(b, out)
    assert float(terms["grid_error"]) > 0.1
    same = type(b)(b.fixed, b.moving, target=out.extras["params"].detach())
    assert float(m.loss(same, out)["grid_loss"]) < 1e-10


def test_chain_from_trained_stages_and_initial_state() -> None:
    torch.manual_seed(0)
    affine = create_method("geometric-matching", transform="affine", **SMALL)
    tps = create_method("geometric-matching", transform="tps", **SMALL)
    chained = GeometricMatching.chain(affine, tps)
    for name, stage in (("affine", affine), ("tps", tps)):
        for k, v in stage.state_dict().items():
            torch.testing.assert_close(chained.stages[name].state_dict()[k], v)
    assert chained.config["transform"] == "affine+tps"
    clone = type(chained)(**chained.config)  # the saved config rebuilds the chain
    clone.load_state_dict(chained.state_dict())
    fresh = _chain(seed=3)
    state = fresh.initial_state(tps.state_dict())  # init: a TPS checkpoint fills its stage
    torch.testing.assert_close(
        state["stages.tps.regressor.fc.weight"], tps.state_dict()["regressor.fc.weight"]
    )
    torch.testing.assert_close(
        state["stages.affine.regressor.fc.weight"],
        fresh.state_dict()["stages.affine.regressor.fc.weight"],
    )
    with pytest.raises(ValueError, match="need an affine then a tps stage"):
        GeometricMatching.chain(tps, affine)


def _train(m, ds, steps: int, batch: int, lr: float = 1e-3) -> None:
    torch.manual_seed(0)
    opt = torch.optim.Adam(m.parameters(), lr)
    m.train()
    for s in range(steps):
        b = collate_pairs([ds[s * batch + i] for i in range(batch)])
        loss = m.loss(b, m(b.fixed, b.moving))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,steps,lr,warps",
    # TPS: 3×3 control points moved by up to ±5 px (±2.5 px barely shows at 32×32)
    [("affine", 90, 3e-3, WARPS), ("tps", 240, 1e-3, {**WARPS, "magnitude": 5.0})],
)
def test_trains_below_the_identity_on_heldout_photos(kind, steps, lr, warps, photos) -> None:
    """Brief training on random warps of training photos; error on held-out photos."""
    train = RandomWarpPairs(photos[0], kind, (S, S), 10**6, seed=1, margin=8, **warps)
    _, b = _heldout(photos, kind, warps=warps)
    torch.manual_seed(0)
    m = create_method("geometric-matching", transform=kind, **SMALL)
    identity = m.model.grid_loss(torch.zeros_like(b.target), b.target)["grid_error"]
    before = m.loss(b, m.predict(b.fixed, b.moving))["grid_error"]
    _train(m, train, steps, 8, lr=lr)
    after = m.loss(b, m.predict(b.fixed, b.moving))["grid_error"]
    assert float(before) == pytest.approx(float(identity), rel=0.02)
    assert after < 0.9 * identity, f"{kind}: {float(after):.3f} vs identity {float(identity):.3f}"


# ---------------------------------------------------------------------------- issue 11 proof
@pytest.mark.parametrize("kind", ["affine", "tps"])
def test_train_then_register_oblique_pair_replays_in_simpleitk(kind, data_root, tmp_path):
    """Issue 11 proof: `learnreg train` a tiny network on random warps of real photos,
    `learnreg register --model` a pair of brain slices at another spacing and an oblique
    direction: the affine is written as an ITK .mat SimpleITK reads as the prediction, the TPS
    as a displacement field (and its inverse); SimpleITK replays both."""
    from learnreg.train.checkpoint import load_checkpoint

    from ._roundtrip import oblique_slices, register_and_replay, train

    config = {
        "method": "geometric-matching",
        "method_config": {**SMALL, "transform": kind},
        "data": {
            "synthetic": {
                "kind": "warp",
                "transform": kind,
                "image_size": [72, 96],
                "margin": 8,
                "length": 64,
                "val_length": 8,
                **WARPS,
            }
        },
        "optimizer": {"lr": 3e-3},
        "steps": 8,
        "batch_size": 4,
        "val_every": 4,
    }
    ckpt = train(config, tmp_path / "train")
    state = load_checkpoint(ckpt)
    assert state["extra"]["preprocess"]["network"]["shape"] == [S, S]
    assert state["extra"]["best_key"] == "error"
    report = register_and_replay(ckpt, *oblique_slices(data_root, "r64slice"), tmp_path / "out")
    files = report["manifest"]["files"]
    if kind == "affine":
        assert report["manifest"]["info"]["transform"] == "AffineTransform"
        assert "affine" in files and "warp" not in files
        assert report["matrix_error"] <= 1e-5, report["matrix_error"]
        from learnreg.io.result import load_result

        a = load_result(tmp_path / "out").affine.homogeneous()[0].double()
        assert float((a - torch.eye(3, dtype=a.dtype)).abs().max()) > 1e-3  # not the identity
        print(f"MAD {report['mad']:.2e}, matrix error {report['matrix_error']:.1e}")
    else:
        assert report["manifest"]["info"]["transform"] == "GridFrame"
        assert {"warp", "inverse_warp"} <= set(files)
        assert report["max_warp_mm"] > 0.05  # a predicted spline (mm), not the identity
        print(f"MAD {report['mad']:.2e}, max |u| {report['max_warp_mm']:.2f} mm")
