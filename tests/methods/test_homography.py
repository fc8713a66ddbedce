"""Homography regression networks (DeTone 2016, Nguyen 2018, Nowruzi 2017) on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.data.datasets import collate_pairs
from learnreg.data.synthetic import HomographyPairs, photo_images
from learnreg.methods.homography import (
    HierarchicalHomographyNet,
    HomographyNet,
    UnsupervisedHomographyNet,
    _standardized,
    corner_error,
    corners_to_homography,
    patch_corners,
)
from learnreg.methods.registry import create_method, method_info
from learnreg.spatial.frame import index_matrix_to_world
from learnreg.spatial.homography import Homography

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


@pytest.fixture(scope="module")
def train_pairs() -> HomographyPairs:
    return HomographyPairs(photo_images("train"), length=4096, seed=1, **PAIRS)


@pytest.fixture(scope="module")
def heldout_batch():
    ds = HomographyPairs(photo_images("heldout"), length=128, seed=123, **PAIRS)
    return collate_pairs([ds[i] for i in range(len(ds))])


@pytest.fixture(scope="module")
def photos_with_context():
    """Held-out pairs with 16 px (8 network voxels) of image around the 32×32 patch."""
    ds = HomographyPairs(photo_images("heldout"), length=4, seed=5, context=16, **PAIRS)
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
    assert m.input_shape == (32, 32)
    want = torch.tensor([[0.0, 0.0], [0.0, 31.0], [31.0, 31.0], [31.0, 0.0]])
    torch.testing.assert_close(patch_corners(32), want)  # DeTone's cyclic order


@pytest.mark.parametrize("name", NAMES)
def test_transform_is_the_world_homography_of_the_grid(name, heldout_batch) -> None:
    """On a network grid placed obliquely in world space, the output transform is the index
    homography conjugated by the grid (``G H G⁻¹``); the voxel field does not depend on the
    grid, and the trainer's validation error is the corner error."""
    torch.manual_seed(0)
    m = create_method(name, **SMALL)
    with torch.no_grad():  # a visible homography instead of the near-identity start
        for key, p in m.named_parameters():
            if key.endswith("head.out.bias"):
                p.normal_(0.0, 0.1)
    b = heldout_batch
    c, s_ = np.cos(0.4), np.sin(0.4)
    grid = Grid((32, 32), (0.8, 1.3), (-20.0, 7.5), ((c, -s_), (s_, c)))
    out = m.predict(b.fixed[:4], b.moving[:4], grid)
    unit = m.predict(b.fixed[:4], b.moving[:4])
    assert isinstance(out.transform, Homography) and out.grid is grid
    assert out.extras["corners"].abs().max() > 0.2
    torch.testing.assert_close(out.displacement, unit.displacement, atol=1e-4, rtol=0)
    want = Homography.from_matrix(index_matrix_to_world(out.extras["homography"].double(), grid))
    torch.testing.assert_close(
        out.transform.homogeneous().double(), want.homogeneous(), atol=1e-5, rtol=1e-5
    )
    # the patch corners, in world coordinates, map to the world positions of c + δ
    corners = patch_corners(32, torch.float64)[None].expand(4, 4, 2)
    world = grid.index_to_world(corners)
    mapped = out.transform(world.float()).double()
    target = grid.index_to_world(corners + out.extras["corners"].double())
    torch.testing.assert_close(mapped, target, atol=1e-3, rtol=0)
    batch = type(b)(b.fixed[:4], b.moving[:4], target=b.target[:4], grid=grid)
    err = m.transform_error(batch, out)
    torch.testing.assert_close(err, corner_error(out.extras["corners"], b.target[:4]))
    assert set(m.validate(batch, out)) == {"error"}


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
    inside = (out.displacement[0] + Grid((32, 32)).index_points().movedim(-1, 0)).numpy()
    keep = (inside >= 0).all(0) & (inside <= 31).all(0)
    assert keep.mean() > 0.7
    # (the dense field comes from the world transform on float32 grid points)
    np.testing.assert_allclose(out.warped[0, 0].numpy()[keep], ref[keep], atol=1e-5)


def test_corner_error_is_mean_euclidean_distance() -> None:
    p = torch.zeros(1, 4, 2)
    t = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    torch.testing.assert_close(corner_error(p, t), torch.tensor([1.75]))
    torch.testing.assert_close(corner_error(p.view(1, 8), t.view(1, 8)), torch.tensor([1.75]))


def test_hierarchy_composes_residuals_on_the_rewarped_image(heldout_batch) -> None:
    """Module 0 made to predict the true offsets exactly: module 1 then sees a pair aligned
    up to interpolation, and its true residual (used by the loss) is zero."""
    b = heldout_batch
    two = [0, 0]  # one pair twice: the heads' batch norm needs batches of >= 2 in training
    item = type(b)(b.fixed[two], b.moving[two], target=b.target[two])
    m = HierarchicalHomographyNet(levels=2, **SMALL).eval()
    head = m.stages[0].head.out
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(item.target[0].flatten() / m.level_scale(0))
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
    with pytest.raises(ValueError, match="at least 2"):
        m.train()(item.fixed[:1], item.moving[:1])
    m.set_trainable_levels([1])
    m.train()
    assert not m.stages[0].training and m.stages[1].training
    assert not any(p.requires_grad for p in m.stages[0].parameters())
    assert "l2_0" in m.loss(item, m(item.fixed, item.moving)) and m.trainable_levels == (1,)
    # the stage-wise schedule from a config: trainable_levels is a constructor argument
    staged = create_method("homography-hierarchical", levels=2, trainable_levels=[1], **SMALL)
    assert staged.trainable_levels == (1,) and staged.config["trainable_levels"] == [1]
    assert not any(p.requires_grad for p in staged.stages[0].parameters())
    trained = {id(p) for p in staged.parameter_groups()["model"]}
    assert trained == {id(p) for p in staged.stages[1].parameters()}


def test_hierarchy_recrops_from_the_context(photos_with_context) -> None:
    """With context, module 0 made exact: module 1's re-cropped moving patch is the fixed patch
    up to interpolation everywhere (no black borders), the re-warped one has zeros; both see
    the same module-0 input and the output transform is the grown grid's homography."""
    b, c = photos_with_context, 8
    kw = {**SMALL, "context": c}
    models = {r: HierarchicalHomographyNet(levels=2, recrop=r, **kw).eval() for r in (1, 0)}
    models[0].load_state_dict(models[1].state_dict())
    seen = {}
    for recrop, m in models.items():
        assert m.input_shape == (48, 48)
        # module 0 predicts the true offsets at the patch corners (from the grown target)
        grown = patch_corners(48, torch.float64)[None]
        h = Homography.from_corners(grown, grown + b.target[:1].double()).homogeneous()
        shift = torch.eye(3, dtype=torch.float64)
        shift[:2, 2] = c
        inner = torch.linalg.inv(shift) @ h @ shift
        corners = patch_corners(32, torch.float64)[None]
        delta = (Homography.from_matrix(inner)(corners) - corners).float()
        with torch.no_grad():
            m.stages[0].head.out.weight.zero_()
            m.stages[0].head.out.bias.copy_(delta[0].flatten() / m.level_scale(0))
        inputs = []
        hook = m.stages[1].register_forward_hook(lambda mod, a, out, seen=inputs: seen.append(a[1]))
        item = type(b)(b.fixed[[0, 0]], b.moving[[0, 0]], target=b.target[[0, 0]])
        out = m(item.fixed, item.moving)
        hook.remove()
        seen[recrop] = inputs[0][0, 0]
        torch.testing.assert_close(out.extras["corners"][0], b.target[0], atol=1e-3, rtol=0)
        losses = m.loss(item, out)
        assert float(losses["l2_0"].detach()) < 1e-9 and float(losses["corner_error_0"]) < 1e-3
    fixed = _standardized(b.fixed[:1, :, c:-c, c:-c])[0, 0]
    assert (seen[1] - fixed).abs().mean() < 0.15
    assert (seen[1] - fixed).abs().mean() < 0.5 * (seen[0] - fixed).abs().mean()


def test_classification_head_quantizes_offsets_into_bins(heldout_batch) -> None:
    """DeTone's classification network: 21 bins per coordinate, cross-entropy to the bin
    of the true offset, the most probable bin's centre as prediction, a confidence per
    corner; a few steps on one batch lower the cross-entropy (the head learns)."""
    torch.manual_seed(0)
    m = HomographyNet(**SMALL, head="classification", dropout=0.0)
    full = heldout_batch
    b = type(full)(full.fixed[:32], full.moving[:32], target=full.target[:32])
    centres = m.bin_centres()
    assert centres.shape == (21,) and float(centres[-1]) == m.offset_scale
    # a true offset at a bin centre gets that bin; beyond the range, the end bins
    t = torch.stack([centres[3], centres[17], 2 * centres[-1], -9.0 * centres[-1]] * 2)
    assert m.target_bins(t.view(1, 4, 2)).tolist() == [[3, 17, 20, 0] * 2]
    out = m(b.fixed, b.moving)
    logits, conf = out.extras["logits"], out.extras["confidence"]
    assert logits.shape == (32, 8, 21) and conf.shape == (32, 4)
    assert bool(((conf > 0) & (conf <= 1)).all())
    assert bool(torch.isin(out.extras["corners"], centres).all())
    terms = m.loss(b, out)
    want = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 21), m.target_bins(b.target.view(-1, 4, 2)).flatten()
    )
    torch.testing.assert_close(terms["total"], want)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    for _ in range(15):
        loss = m.loss(b, m(b.fixed, b.moving))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(m.loss(b, m(b.fixed, b.moving))["total"].detach()) < 0.9 * float(terms["total"])
    with pytest.raises(ValueError, match="head"):
        HomographyNet(**SMALL, head="ordinal")


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
    u = UnsupervisedHomographyNet(**SMALL).eval()  # batch norm in its head: 1 pair, eval
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
# Held-out corner error / identity must fall below these. Measured with this protocol:
#   homography-net           0.796 (seed 0, 1 and 2 threads), 0.913, 0.927, 0.912 (seeds 1-3)
#   homography-unsupervised  0.885, 0.883, 0.875 (seeds 0-2, 1 thread; 0.945 s0 before the fix)
#   homography-hierarchical  0.754, 0.851, 0.823, 0.790 (seeds 0-3, 1 thread),
#                            0.766, 0.782, 0.778 (seeds 0-2, 2 threads)
# (before standardized inputs and batch-normalized heads: 0.809, 1.002, 1.006 for seeds 0-2)
# so each bound keeps >= 0.04 from the worst seed measured.
BOUNDS = {"homography-net": 0.97, "homography-unsupervised": 0.95, "homography-hierarchical": 0.92}


@pytest.mark.slow
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
    assert after < BOUNDS[name] * identity, (
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


# ---------------------------------------------------------------------------- issue 11 proof
TINY = {"patch_size": 32, "features": [8, 8, 8, 8, 16, 16, 16, 16], "hidden": [32], "dropout": 0}
SOURCE = {"kind": "homography", "images": "photos", "patch_size": 64, "downsample": 2, "rho": 8}


def _config(name: str, extra: dict | None = None, **top) -> dict:
    return {
        "method": name,
        "method_config": {**TINY, **(extra or {})},
        "data": {"synthetic": {**SOURCE, "length": 64, "val_length": 8}},
        "optimizer": {"lr": 1e-2},
        "steps": 8,
        "batch_size": 4,
        "val_every": 4,
        **top,
    }


@pytest.mark.parametrize("name", NAMES)
def test_train_then_register_oblique_pair_replays_in_simpleitk(name, data_root, tmp_path):
    """Issue 11 proof: `learnreg train` a tiny network on DeTone's pairs of real photos,
    `learnreg register --model` a pair of brain slices given at another spacing and an
    oblique direction; the homography is written as a displacement field (and its inverse)
    that SimpleITK replays. The hierarchy trains by config in Nowruzi's two stages (module 1,
    then module 2 from stage 1's weights)."""
    from learnreg.train.checkpoint import load_checkpoint

    from ._roundtrip import oblique_slices, register_and_replay, train

    if name == "homography-hierarchical":
        first = train(_config(name, {"levels": 2, "trainable_levels": [0]}), tmp_path / "s1")
        ckpt = train(
            _config(name, {"levels": 2, "trainable_levels": [1]}, init=str(first)),
            tmp_path / "s2",
        )
        a, b = load_checkpoint(first)["model"], load_checkpoint(ckpt)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("stages.0."))
        assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("stages.1."))
    else:
        ckpt = train(_config(name), tmp_path / "train")
    state = load_checkpoint(ckpt)
    assert state["extra"]["grid"]["shape"] == [32, 32]
    assert state["extra"]["preprocess"]["network"]["shape"] == [32, 32]
    assert state["extra"]["best_key"] == "error"  # validated by the corner error
    report = register_and_replay(ckpt, *oblique_slices(data_root, "r16slice"), tmp_path / "out")
    assert report["manifest"]["info"]["transform"] == "Homography"
    assert {"warp", "inverse_warp"} <= set(report["manifest"]["files"])
    assert report["max_warp_mm"] > 0.05  # a predicted homography (mm), not the identity
    print(f"MAD {report['mad']:.2e}, max |u| {report['max_warp_mm']:.2f} mm")
