"""IC-STN (Lin & Lucey 2017): recurrent affine predictor composing parameters, on real
brain slices and photographs."""

from __future__ import annotations

import pytest
import torch

from learnreg.data.datasets import collate_pairs
from learnreg.data.random_warps import RandomWarpPairs
from learnreg.data.synthetic import brain_slice_images, photo_images
from learnreg.methods.dlir import affine_displacement
from learnreg.methods.geometric_matching import affine_matrix
from learnreg.methods.icstn import ICSTN
from learnreg.methods.registry import create_method, method_info
from learnreg.spatial.sampling import warp

S = 32
SMALL = {"shape": (S, S), "features": (16, 32), "downsample_after": (0, 1), "steps": 3}
WARPS = {"rotation": 10.0, "translation": 3.0, "scale": 0.1, "shear": 0.05}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    torch.testing.assert_close(m.net.seen[2], warp(moving, affine_displacement(prior, (S, S))))
    torch.testing.assert_close(out.warped, warp(moving, affine_displacement(want, (S, S))))
    assert out.extras["step_params"].shape == (2, 3, 6)
    torch.testing.assert_close(out.extras["step_params"][:, 0], ups[0])


def test_forward_starts_at_identity_and_works_in_3d(heldout) -> None:
    m = create_method("icstn", **SMALL)
    out = m.predict(heldout.fixed[:3], heldout.moving[:3])
    assert out.displacement.shape == (3, 2, S, S) and out.extras["params"].shape == (3, 6)
    assert out.displacement.abs().max() < 0.5
    assert type(m)(**m.config).config == m.config
    m3 = ICSTN(ndim=3, shape=(16, 16, 16), features=(4, 8), downsample_after=(0, 1), steps=2)
    x = torch.rand(2, 1, 16, 16, 16)
    out3 = m3(x, x)
    assert out3.displacement.shape == (2, 3, 16, 16, 16) and out3.extras["params"].shape == (2, 12)
    loss = m3.loss(type(heldout)(x, x, target=torch.zeros(2, 12)), out3)
    loss["total"].backward()


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


def test_trains_below_the_identity_on_heldout_affine_warps(images) -> None:
    """Brief training (300 steps of 8, learning rate 3e-4) on random affine warps: rotation
    ±10°, translation ±3 px, scale ±10 %, shear ±0.05, on 32×32 crops."""
    after, identity = _train_and_evaluate(images, WARPS, 300, lr=3e-4)
    assert after < 0.9 * identity, f"{after:.3f} vs identity {identity:.3f}"
