"""IC-STN (Lin & Lucey 2017): recurrent affine predictor composing parameters, on real
brain slices and photographs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.data.datasets import collate_pairs
from learnreg.data.random_warps import RandomWarpPairs
from learnreg.data.synthetic import brain_slice_images, photo_images
from learnreg.methods.geometric_matching import affine_matrix
from learnreg.methods.icstn import ICSTN
from learnreg.methods.registry import create_method, method_info
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.frame import index_matrix_to_world
from learnreg.spatial.sampling import warp

S = 32
SMALL = {"shape": (S, S), "features": (16, 32), "downsample_after": (0, 1), "steps": 3}
WARPS = {"rotation": 10.0, "translation": 3.0, "scale": 0.1, "shear": 0.05}


@pytest.fixture(scope="module")
def images():
    train = {**photo_images("train", (72, 96)), **brain_slice_images("train", (72, 96))}
    heldout = {**photo_images("heldout", (72, 96)), **brain_slice_images("heldout", (72, 96))}
    return train, heldout


@pytest.fixture(scope="module")
def heldout(images):
    ds = RandomWarpPairs(images[1], "affine", (S, S), 64, seed=99, margin=8, **WARPS)
    return collate_pairs([ds[i] for i in range(64)])


def test_registered_with_table_attributes() -> None:
    info = method_info("ic-stn")
    assert info.name == "icstn" and info.cls is ICSTN and info.year == 2017
    assert "affine" in info.transform and "Lin" in info.reference


class _Scripted(torch.nn.Module):
    """Stands in for the predictor: returns fixed updates, records what it was shown."""

    def __init__(self, updates: list[torch.Tensor]) -> None:
        super().__init__()
        self.updates, self.seen = updates, []

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        self.seen.append(warped.detach().clone())
        return self.updates[len(self.seen) - 1]


def test_warps_the_original_image_and_composes_parameters(heldout) -> None:
    m = create_method("icstn", **SMALL).double()
    fixed, moving = heldout.fixed[:2].double(), heldout.moving[:2].double()
    g = torch.Generator().manual_seed(0)
    ups = [0.05 * torch.randn(2, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    ups = [u * torch.tensor([1, 1, 20, 1, 1, 20.0], dtype=torch.float64) for u in ups]
    m.net = _Scripted([u / m.unit.double() for u in ups])
    out = m(fixed, moving)
    mats = [affine_matrix(u, (S, S)) for u in ups]
    want = mats[0] @ mats[1] @ mats[2]  # T1 ∘ T2 ∘ T3: the last update acts first
    torch.testing.assert_close(out.extras["matrix"], want)
    # step k saw the ORIGINAL moving image warped once by the composed parameters so far
    torch.testing.assert_close(m.net.seen[0], moving)
    prior = mats[0] @ mats[1]
    index = Grid((S, S))
    x = index.index_points(torch.float64)

    def field(matrix):  # T(x) − x of index points, channels first
        return x @ matrix[:, :2, :2].transpose(1, 2)[:, None] + matrix[:, None, None, :2, 2] - x

    ref = warp(moving, field(prior).movedim(-1, 1))
    torch.testing.assert_close(m.net.seen[2], ref, atol=1e-5, rtol=0)
    ref = warp(moving, field(want).movedim(-1, 1))
    torch.testing.assert_close(out.warped, ref, atol=1e-5, rtol=0)
    # the output: the composed affine on world points of the grid (unit grid here)
    assert isinstance(out.transform, AffineTransform)
    torch.testing.assert_close(out.transform.homogeneous(), want)
    assert out.extras["step_params"].shape == (2, 3, 6)
    torch.testing.assert_close(out.extras["step_params"][:, 0], ups[0])


def test_forward_starts_at_identity_and_works_in_3d(heldout) -> None:
    m = create_method("icstn", **SMALL)
    out = m.predict(heldout.fixed[:3], heldout.moving[:3])
    assert out.displacement.shape == (3, 2, S, S) and out.extras["params"].shape == (3, 6)
    assert out.displacement.abs().max() < 0.5
    assert type(m)(**m.config).config == m.config and m.input_shape == (S, S)
    m3 = ICSTN(ndim=3, shape=(16, 16, 16), features=(4, 8), downsample_after=(0, 1), steps=2)
    x = torch.rand(2, 1, 16, 16, 16)
    out3 = m3(x, x)
    assert out3.displacement.shape == (2, 3, 16, 16, 16) and out3.extras["params"].shape == (2, 12)
    loss = m3.loss(type(heldout)(x, x, target=torch.zeros(2, 12)), out3)
    loss["total"].backward()


def test_transform_is_world_space_on_the_network_grid(heldout) -> None:
    """On an oblique physical grid the composed index affine becomes ``G M G⁻¹``; the voxel
    field and the warped image do not depend on the grid; validation error = grid error."""
    torch.manual_seed(0)
    m = create_method("icstn", **SMALL)
    with torch.no_grad():
        m.net.head.out.bias.normal_(0.0, 0.5)
    c, s_ = np.cos(0.5), np.sin(0.5)
    grid = Grid((S, S), (2.0, 0.5), (-3.0, 40.0), ((c, -s_), (s_, c)))
    b = heldout
    out = m.predict(b.fixed[:4], b.moving[:4], grid)
    unit = m.predict(b.fixed[:4], b.moving[:4])
    assert out.displacement.abs().max() > 0.3
    torch.testing.assert_close(out.displacement, unit.displacement, atol=1e-4, rtol=0)
    want = index_matrix_to_world(out.extras["matrix"].double(), grid)
    torch.testing.assert_close(out.transform.homogeneous().double(), want, atol=1e-5, rtol=0)
    batch = type(b)(b.fixed[:4], b.moving[:4], target=b.target[:4], grid=grid)
    err = m.transform_error(batch, out)
    torch.testing.assert_close(err.mean(), m.loss(batch, out)["grid_error"])
    assert set(m.validate(batch, out)) == {"error"}


def test_bad_inputs_raise_value_error(heldout) -> None:
    m = create_method("icstn", **SMALL)
    b = heldout
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        m(b.fixed[:2, :, :16], b.moving[:2, :, :16])
    out = m(b.fixed[:2], b.moving[:2])
    with pytest.raises(ValueError, match="supervised"):
        m.loss(type(b)(b.fixed[:2], b.moving[:2]), out)
    with pytest.raises(ValueError, match="target must be"):
        m.loss(type(b)(b.fixed[:2], b.moving[:2], target=torch.zeros(2, 8)), out)
    with pytest.raises(ValueError, match="steps"):
        create_method("icstn", steps=0)


def _train_and_evaluate(images, warps: dict, steps: int, lr: float = 1e-3):
    train = RandomWarpPairs(images[0], "affine", (S, S), 10**6, seed=1, margin=8, **warps)
    test = RandomWarpPairs(images[1], "affine", (S, S), 64, seed=99, margin=8, **warps)
    b = collate_pairs([test[i] for i in range(64)])
    torch.manual_seed(0)
    m = create_method("icstn", **SMALL)
    identity = m.model.grid_loss(torch.zeros_like(b.target), b.target)["grid_error"]
    before = m.loss(b, m.predict(b.fixed, b.moving))["grid_error"]
    opt = torch.optim.Adam(m.parameters(), lr)
    m.train()
    for s in range(steps):
        batch = collate_pairs([train[s * 8 + i] for i in range(8)])
        loss = m.loss(batch, m(batch.fixed, batch.moving))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = m.loss(b, m.predict(b.fixed, b.moving))["grid_error"]
    assert float(before) == pytest.approx(float(identity), rel=0.02)
    return float(after), float(identity)


@pytest.mark.slow
def test_trains_below_the_identity_on_heldout_affine_warps(images) -> None:
    """Brief training (300 steps of 8, learning rate 3e-4) on random affine warps: rotation
    ±10°, translation ±3 px, scale ±10 %, shear ±0.05, on 32×32 crops."""
    after, identity = _train_and_evaluate(images, WARPS, 300, lr=3e-4)
    assert after < 0.9 * identity, f"{after:.3f} vs identity {identity:.3f}"


# ---------------------------------------------------------------------------- issue 11 proof
def test_train_then_register_oblique_pair_replays_in_simpleitk(data_root, tmp_path):
    """Issue 11 proof: `learnreg train` a tiny IC-STN on random affine warps of brain slices,
    `learnreg register --model` a pair at another spacing and an oblique direction: the
    composed affine is written as an ITK .mat that SimpleITK reads as the prediction."""
    from learnreg.io.result import load_result

    from ._roundtrip import oblique_slices, register_and_replay, train

    config = {
        "method": "icstn",
        "method_config": {**SMALL, "shape": [S, S], "downsample_after": [0, 1]},
        "data": {
            "synthetic": {
                "kind": "warp",
                "images": "brains",
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
    report = register_and_replay(ckpt, *oblique_slices(data_root, "r64slice"), tmp_path / "out")
    assert report["manifest"]["info"]["transform"] == "AffineTransform"
    assert "affine" in report["manifest"]["files"] and "warp" not in report["manifest"]["files"]
    assert report["matrix_error"] <= 1e-5, report["matrix_error"]
    a = load_result(tmp_path / "out").affine.homogeneous()[0].double()
    assert float((a - torch.eye(3, dtype=a.dtype)).abs().max()) > 1e-3  # not the identity
    print(f"MAD {report['mad']:.2e}, matrix error {report['matrix_error']:.1e}")
