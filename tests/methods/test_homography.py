"""Homography regression networks (DeTone 2016, Nguyen 2018, Nowruzi 2017) on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.data.datasets import collate_pairs
from learnreg.data.synthetic import HomographyPairs, photo_images
from learnreg.data.synthetic import patch_corners as data_corners
from learnreg.methods.homography import (
    HierarchicalHomographyNet,
    HomographyNet,
    UnsupervisedHomographyNet,
    corner_error,
    corners_to_homography,
    homography_displacement,
    patch_corners,
)
from learnreg.methods.registry import create_method, method_info

skimage = pytest.importorskip("skimage")
from skimage.transform import ProjectiveTransform  # noqa: E402
from skimage.transform import warp as sk_warp  # noqa: E402

NAMES = ("homography-net", "homography-unsupervised", "homography-hierarchical")
CLASSES = dict(
    zip(NAMES, (HomographyNet, UnsupervisedHomographyNet, HierarchicalHomographyNet), strict=True)
)
# DeTone's protocol at a quarter of its size for a fast CPU test: 64-pixel patches with
# corners perturbed by up to 8 pixels, both area-averaged to the network's 32×32
PAIRS = {"patch_size": 64, "rho": 8.0, "downsample": 2}
SMALL = {"patch_size": 32, "features": (16, 16, 16, 16, 32, 32, 32, 32), "hidden": (128,)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def train_pairs() -> HomographyPairs:
    return HomographyPairs(photo_images("train"), length=4096, seed=1, **PAIRS)


@pytest.fixture(scope="module")
def heldout_batch():
    ds = HomographyPairs(photo_images("heldout"), length=128, seed=123, **PAIRS)
    return collate_pairs([ds[i] for i in range(len(ds))])


def _xy(p: np.ndarray) -> np.ndarray:
    return p[..., ::-1].copy()


def _projective(src: np.ndarray, dst: np.ndarray) -> ProjectiveTransform:
    if hasattr(ProjectiveTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = ProjectiveTransform.from_estimate(src, dst)
    else:  # pragma: no cover - older scikit-image
        tform = ProjectiveTransform()
        tform = tform if tform.estimate(src, dst) else None
    assert tform
    return tform


# ---------------------------------------------------------------------------- registry, shapes
def test_registered_with_table_attributes() -> None:
    years = {
        "homography-net": 2016,
        "homography-unsupervised": 2018,
        "homography-hierarchical": 2017,
    }
    for name in NAMES:
        info = method_info(name)
        assert info.year == years[name] and info.ndim == "2D" and "homography" in info.transform
    assert "unsupervised" == method_info("nguyen").supervision
    assert method_info("detone").name == "homography-net"


@pytest.mark.parametrize("name", NAMES)
def test_forward_output_is_consistent_with_its_corners(name, heldout_batch) -> None:
    m = create_method(name, **SMALL)
    b = heldout_batch
    out = m.predict(b.fixed[:3], b.moving[:3])
    assert out.displacement.shape == (3, 2, 32, 32) and out.warped.shape == (3, 1, 32, 32)
    corners, h = out.extras["corners"], out.extras["homography"]
    assert corners.shape == (3, 4, 2) and h.shape == (3, 3, 3)
    assert corners.abs().max() < 1.0  # untrained: (almost) the identity
    # the dense field at the corner voxels is the corner offsets
    idx = patch_corners(32).long()
    at = out.displacement[:, :, idx[:, 0], idx[:, 1]].transpose(1, 2)
    torch.testing.assert_close(at, corners, atol=1e-4, rtol=1e-4)
    assert m.config["offset_scale"] == 8.0
    assert type(m)(**m.config).config == m.config
    torch.testing.assert_close(patch_corners(32), data_corners(32))


def test_dlt_and_warp_match_skimage_projective_transform(heldout_batch) -> None:
    b = heldout_batch
    offsets = torch.tensor(
        [[[1.5, -2.0], [-3.0, 2.5], [2.0, 3.5], [-1.0, -4.0]], [[0.0] * 2] * 4],
        dtype=torch.float64,
    )
    h = corners_to_homography(offsets, 32).homogeneous()
    c = patch_corners(32, torch.float64).numpy()
    tform = _projective(c, c + offsets[0].numpy())  # index order: any 2D points work
    np.testing.assert_allclose(h[0].numpy(), tform.params / tform.params[2, 2], atol=1e-9)
    np.testing.assert_allclose(h[1].numpy(), np.eye(3), atol=1e-12)
    # the spatial transformer: warped(x) = moving(T(x)), as skimage.transform.warp
    m = HomographyNet(**SMALL)
    moving = b.moving[:1].double()
    out = m.output(moving, h[:1], {})
    txy = _projective(_xy(c), _xy(c + offsets[0].numpy()))
    ref = sk_warp(moving[0, 0].numpy(), txy, order=1, mode="constant", cval=0.0)
    inside = homography_displacement(h[:1], (32, 32))[0].numpy() + np.stack(
        np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    )
    keep = (inside >= 0).all(0) & (inside <= 31).all(0)
    assert keep.mean() > 0.7
    np.testing.assert_allclose(out.warped[0, 0].numpy()[keep], ref[keep], atol=1e-6)


def test_corner_error_is_mean_euclidean_distance() -> None:
    p = torch.zeros(1, 4, 2)
    t = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    torch.testing.assert_close(corner_error(p, t), torch.tensor([1.75]))
    torch.testing.assert_close(corner_error(p.view(1, 8), t.view(1, 8)), torch.tensor([1.75]))


def test_hierarchy_composes_residuals_on_the_rewarped_image(heldout_batch) -> None:
    """Module 0 made to predict the true offsets exactly: module 1 then sees a pair aligned
    up to interpolation, and its true residual (used by the loss) is zero."""
    b = heldout_batch
    item = type(b)(b.fixed[:1], b.moving[:1], target=b.target[:1])
    m = HierarchicalHomographyNet(levels=2, **SMALL).eval()
    head = m.stages[0].head.out
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(item.target.flatten() / m.level_scale(0))
    out = m(item.fixed, item.moving)
    torch.testing.assert_close(out.extras["residuals"][:, 0], item.target, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.extras["module_corners"][:, -1], out.extras["corners"])
    truth = corners_to_homography(item.target, 32).homogeneous()
    torch.testing.assert_close(out.extras["priors"][:, 1], truth, atol=1e-5, rtol=1e-5)
    losses = m.loss(item, out)
    assert float(losses["l2_0"].detach()) < 1e-9 and float(losses["corner_error_0"]) < 1e-3
    pred1 = out.extras["residuals"][:, 1] / m.level_scale(1)
    torch.testing.assert_close(losses["l2_1"], pred1.square().mean(), atol=1e-6, rtol=1e-3)
    # the moving patch re-warped by module 0 is the fixed patch where both are defined
    mask = out.warped > 0
    assert (out.warped - item.fixed)[mask].abs().mean() < 0.3 * (
        item.moving - item.fixed
    ).abs().mean()
    m.set_trainable_levels([1])
    m.train()
    assert not m.stages[0].training and m.stages[1].training
    assert not any(p.requires_grad for p in m.stages[0].parameters())
    assert "l2_0" in m.loss(item, m(item.fixed, item.moving)) and m.trainable_levels == (1,)


def test_bad_inputs_raise_value_error(heldout_batch) -> None:
    m = HomographyNet(**SMALL)
    x = heldout_batch.fixed[:2]
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        m(x[..., :16], x[..., :16])
    with pytest.raises(ValueError, match="2D patches"):
        m(x[:, :, None], x[:, :, None])
    with pytest.raises(ValueError, match="2D patches"):
        m(x, x[:1])
    batch = collate_pairs([{"fixed": x[0], "moving": x[1]}])
    with pytest.raises(ValueError, match="supervised"):
        m.loss(batch, m(batch.fixed, batch.moving))
    bad = type(batch)(batch.fixed, batch.moving, target=torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match=r"\(N, 4, 2\)"):
        m.loss(bad, m(batch.fixed, batch.moving))
    with pytest.raises(ValueError, match="levels"):
        create_method("homography-hierarchical", levels=0)
    with pytest.raises(ValueError, match="unknown config"):
        create_method("homography-net", rho=3)
    with pytest.raises(ValueError, match="offset_scale"):
        HomographyNet(offset_scale=0.0)
    # the unsupervised loss needs no target
    u = UnsupervisedHomographyNet(**SMALL)
    assert set(u.loss(batch, u(batch.fixed, batch.moving))) == {"total", "l1"}


# ---------------------------------------------------------------------------- training
def _train(
    method, pairs: HomographyPairs, steps: int, batch: int, lr: float, start: int = 0
) -> None:
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr)
    n = len(pairs)
    cache = {}
    for s in range(start, start + steps):
        ids = [(s * batch + i) % n for i in range(batch)]
        items = [cache.setdefault(i, pairs[i]) for i in ids]
        b = collate_pairs(items)
        method.train()
        loss = method.loss(b, method(b.fixed, b.moving))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()


TRAINING = {  # steps, batch, lr, config
    "homography-net": (400, 16, 1e-3, {"dropout": 0.0}),
    "homography-unsupervised": (400, 16, 1e-3, {"dropout": 0.0}),
    # Nowruzi et al.'s schedule: module 1 alone, then module 2 on its re-warped output
    "homography-hierarchical": ((400, 150), 16, 1e-3, {"dropout": 0.0, "levels": 2}),
}


@pytest.mark.parametrize("name", NAMES)
def test_trains_below_the_identity_on_heldout_photos(name, train_pairs, heldout_batch) -> None:
    steps, batch, lr, cfg = TRAINING[name]
    torch.manual_seed(0)
    m = CLASSES[name](**SMALL, **cfg)
    b = heldout_batch
    identity = corner_error(torch.zeros_like(b.target), b.target).mean()
    before = corner_error(m.predict(b.fixed, b.moving).extras["corners"], b.target).mean()
    if isinstance(m, HierarchicalHomographyNet):
        m.set_trainable_levels([0])
        _train(m, train_pairs, steps[0], batch, lr)
        m.set_trainable_levels([1])
        _train(m, train_pairs, steps[1], batch, lr, start=steps[0])
    else:
        _train(m, train_pairs, steps, batch, lr)
    after = corner_error(m.predict(b.fixed, b.moving).extras["corners"], b.target).mean()
    assert before == pytest.approx(float(identity), abs=0.05)
    assert after < 0.95 * identity, (
        f"{name}: {float(after):.3f} px vs identity {float(identity):.3f}"
    )


def test_trains_with_the_trainer(train_pairs, tmp_path) -> None:
    from learnreg.train.config import TrainConfig
    from learnreg.train.trainer import Trainer

    cfg = TrainConfig(
        method="homography-net",
        steps=3,
        batch_size=4,
        log_every=1,
        checkpoint_every=3,
        progress=False,
        device="cpu",
        output=str(tmp_path),
    )
    m = HomographyNet(**SMALL)
    summary = Trainer(cfg, m, train_pairs).fit()
    assert summary["step"] == 3
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert "corner_error" in (tmp_path / "log.csv").read_text()
