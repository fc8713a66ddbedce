"""DLIR (de Vos et al. 2019): the decomposed affine and the stage composition against
independent constructions, stage-wise training controls, and brief unsupervised training on
real LPBA40 volumes (8 mm): atlas S01 fixed, subjects moved by random affine transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation
from torch import nn

from learnreg.core.grid import Grid
from learnreg.data.datasets import collate_pairs
from learnreg.data.perturb import PerturbedPairs, RandomPerturbation
from learnreg.io.images import read_image, read_labels
from learnreg.losses.functional import ncc
from learnreg.methods.base import RegistrationBatch
from learnreg.methods.dlir import DLIR, BSplineNet, decomposed_affine
from learnreg.methods.registry import create_method, method_info
from learnreg.metrics import mean_dice
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.base import TransformChain
from learnreg.spatial.bspline import BSplineTransform, control_lattice_shape
from learnreg.spatial.sampling import warp

TINY = {"affine_features": 4, "bspline_features": 4, "affine_hidden": (8,)}
SMALL = {"affine_features": 8, "bspline_features": 8, "affine_downsamplings": 3}


@pytest.fixture(scope="module")
def lpba8(lpba) -> dict:
    """Volumes at 8 mm (area-averaged, max-normalized); labels of S01, S35, S36 (centre voxel
    of each 8³ block)."""
    out = {}
    for n in ("S01", "S11", "S12", "S13", "S14", "S15", "S16", "S35", "S36"):
        x = F.avg_pool3d(read_image(lpba / f"images/{n}.nii.gz").data[None].float(), 8)[0]
        out[n] = x / x.amax()
        if n in ("S01", "S35", "S36"):
            lab = read_labels(lpba / f"labels/{n}.nii.gz").data.long()
            out[n + "_labels"] = lab[:, 4::8, 4::8, 4::8]
    return out


# ---------------------------------------------------------------------------- structure
def test_registered_with_table_attributes_and_config():
    info = method_info("de-vos")
    assert info.name == "dlir" and info.year == 2019 and info.supervision == "unsupervised"
    assert "B-spline" in info.transform and "NCC" in info.loss
    m = create_method("dlir", ndim=2, bspline_spacings=(8,), **TINY)
    clone = type(m)(**m.config)
    clone.load_state_dict(m.state_dict())
    # pseudo-siamese: two pipelines of the same architecture, their own weights
    enc = m.affine_net.encoder
    assert enc.mode == "pseudo-siamese" and enc.other_tower is not None
    assert (
        enc.tower.layers[0].conv.weight.data_ptr()
        != enc.other_tower.layers[0].conv.weight.data_ptr()
    )
    assert any(isinstance(x, nn.AvgPool2d) for x in enc.modules())
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())


def test_decomposed_affine_matches_independent_construction():
    g = torch.Generator().manual_seed(0)
    t, w, s, sh = (torch.randn(3, k, generator=g, dtype=torch.float64) * 0.2 for k in (3, 3, 3, 3))
    c = torch.tensor([9.5, 11.5, 9.5], dtype=torch.float64)
    m = decomposed_affine(t, w, s, sh, c)
    for i in range(3):
        rot = Rotation.from_rotvec(w[i].numpy()).as_matrix()
        shear = np.array([[1, sh[i, 0], sh[i, 1]], [0, 1, sh[i, 2]], [0, 0, 1]])
        lin = rot @ shear @ np.diag(np.exp(s[i].numpy()))
        x = np.array([1.0, -3.0, 7.0])
        want = lin @ (x - c.numpy()) + c.numpy() + t[i].numpy()
        got = m[i, :3, :3].numpy() @ x + m[i, :3, 3].numpy()
        np.testing.assert_allclose(got, want, atol=1e-12)
    # 2D: one angle (float64: float32 matrix_exp is only accurate to ~3e-5)
    z = torch.zeros(1, 2, dtype=torch.float64)
    m2 = decomposed_affine(z, torch.tensor([[0.5]], dtype=torch.float64), z, z[:, :1], z[0])
    want2 = [[np.cos(0.5), -np.sin(0.5)], [np.sin(0.5), np.cos(0.5)]]
    np.testing.assert_allclose(m2[0, :2, :2].numpy(), want2, atol=1e-12)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        decomposed_affine(
            torch.zeros(1, 3), torch.zeros(1, 1), torch.zeros(1, 3), torch.zeros(1, 3), c
        )


@pytest.mark.parametrize("ndim,shape", [(2, (32, 40)), (3, (16, 20, 16))])
def test_untrained_network_is_the_identity_and_gradients_flow(ndim, shape):
    torch.manual_seed(0)
    m = DLIR(ndim, bspline_spacings=(8, 4), **TINY)
    f, mv = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    out = m(f, mv)
    assert out.displacement.shape == (2, ndim, *shape) and out.displacement.abs().max() == 0
    torch.testing.assert_close(out.warped, mv)
    assert out.extras["stage_warped"].shape == (2, 3, *shape)
    assert out.extras["bspline_fields"].shape == (2, 2, ndim, *shape)
    for k, s in ((1, 8), (2, 4)):
        assert out.extras[f"coefficients_{k}"].shape[2:] == control_lattice_shape(shape, [s] * ndim)
    terms = m.loss(RegistrationBatch(f, mv), out)
    assert set(terms) >= {"total", "sim_0", "sim_1", "sim_2", "bending_1", "bending_2"}
    terms["total"].backward()
    assert m.affine_net.head.out.weight.grad.abs().sum() > 0
    assert m.bspline_nets[1].out.weight.grad.abs().sum() > 0


def test_stages_compose_with_the_affine_applied_exactly():
    """Constant B-spline fields c1, c2 and a known affine A: the composed map must be
    x ↦ A(x + c2 + c1) (the last stage acts first on fixed points): the transform is the
    chain [B-spline 2, B-spline 1, affine]."""
    shape = (16, 20, 16)
    m = DLIR(3, bspline_spacings=(8, 4), **TINY).eval()
    params = torch.tensor([[0.1, -0.05, 0.0, 0.0, 0.0, 0.2, 0.05, 0.0, -0.05, 0.1, 0.0, 0.0]])
    consts = (torch.tensor([1.0, -0.5, 0.25]), torch.tensor([-0.5, 0.75, 0.5]))
    with torch.no_grad():
        m.affine_net.head.out.bias.copy_(params[0])
        for net, c in zip(m.bspline_nets, consts, strict=True):
            net.out.bias.copy_(c)  # zero weights: constant coefficients → constant field
    f = torch.rand(1, 1, *shape)
    out = m(f, f)
    a = out.extras["affine"][0]
    torch.testing.assert_close(a, m.affine_net.matrix(params, Grid(shape))[0])
    chain = out.transform
    assert isinstance(chain, TransformChain)
    assert [type(t) for t in chain.transforms] == [
        BSplineTransform,
        BSplineTransform,
        AffineTransform,
    ]
    assert [t.control_spacing for t in chain.transforms[:2]] == [(4,) * 3, (8,) * 3]
    torch.testing.assert_close(out.extras["bspline_fields"][0, 0, :, 5, 5, 5], consts[0])
    x = torch.tensor([5.0, 6.0, 7.0])
    want = a[:3, :3] @ (x + consts[0] + consts[1]) + a[:3, 3] - x
    torch.testing.assert_close(out.displacement[0, :, 5, 6, 7], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.warped, warp(f, out.displacement))


def test_transform_is_the_index_space_prediction_in_world_space():
    """The networks see images only: on an oblique, anisotropic world grid the voxel
    displacement is the same as on the unit grid, and the transform maps a grid point's
    world position G(x) to G(x + u(x))."""
    torch.manual_seed(0)
    shape = (16, 20)
    m = DLIR(2, bspline_spacings=(8, 4), **TINY).eval()
    with torch.no_grad():
        m.affine_net.head.out.bias.copy_(torch.tensor([0.1, -0.05, 0.1, 0.05, -0.05, 0.1]))
        for net in m.bspline_nets:
            net.out.weight.normal_(0.0, 0.05)  # a real, varying field
    f, mv = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    c, s = np.cos(0.4), np.sin(0.4)
    grid = Grid(shape, (1.5, 0.75), (-20.0, 7.0), ((c, -s), (s, c)))
    unit, world = m.predict(f, mv), m.predict(f, mv, grid)
    assert unit.displacement.abs().max() > 0.5
    torch.testing.assert_close(world.displacement, unit.displacement, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(world.warped, unit.warped, atol=1e-4, rtol=1e-4)
    x = torch.tensor([[3.0, 5.0], [10.0, 17.0]], dtype=torch.float64)
    mapped = world.transform(grid.index_to_world(x).float()[None])[0].double()
    u = unit.displacement[0, :, x[:, 0].long(), x[:, 1].long()].T.double()
    torch.testing.assert_close(mapped, grid.index_to_world(x + u), atol=1e-3, rtol=0)


def test_stage_wise_training_freezes_and_skips_stages():
    m = DLIR(3, bspline_spacings=(8, 4), **TINY)
    m.set_trainable_stages([1])
    assert not any(p.requires_grad for p in m.affine_net.parameters())
    assert not any(p.requires_grad for p in m.bspline_nets[1].parameters())
    m.train()
    assert not m.affine_net.training and m.bspline_nets[0].training
    f = torch.rand(2, 1, 16, 16, 16)
    out = m(f, f)
    assert out.extras["stage_warped"].shape[1] == 2  # stage 2 skipped while training
    terms = m.loss(RegistrationBatch(f, f), out)
    torch.testing.assert_close(
        terms["total"], terms["sim_1"] + m.bending_weight * terms["bending_1"]
    )
    assert m.predict(f, f).extras["stage_warped"].shape[1] == 3  # eval: every stage
    with pytest.raises(ValueError, match="non-empty subset of 0..2"):
        m.set_trainable_stages([3])
    with pytest.raises(ValueError, match="power of two"):
        BSplineNet(3, 6)
    with pytest.raises(ValueError, match="similarity must be one of"):
        DLIR(3, similarity="mi")
    with pytest.raises(ValueError, match=r"\(N, 1, \*S\) with 3 spatial dims"):
        m(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="at least 16 voxels"):
        m.predict(torch.zeros(1, 1, 8, 16, 16), torch.zeros(1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match="not on the grid"):
        m(f, f, Grid((16, 16, 8)))


# ---------------------------------------------------------------------------- training
def _dice(batch, displacement) -> float:
    warped = warp(batch.moving_labels, displacement, mode="label")
    return float(
        np.mean([mean_dice(batch.fixed_labels[i, 0], warped[i, 0]) for i in range(len(warped))])
    )


def test_unsupervised_training_aligns_held_out_subjects(lpba8):
    """Affine stage (100 steps), then the B-spline stage (50 steps, affine frozen), NCC only:
    on held-out subjects moved by random affine transforms, the affine stage beats the
    identity in NCC and Dice, and the B-spline stage improves NCC over the affine."""
    fixed, fixed_lab = lpba8["S01"], lpba8["S01_labels"]
    train = [{"fixed": fixed, "moving": lpba8[f"S1{i}"]} for i in range(1, 7)]
    test = [
        {
            "fixed": fixed,
            "moving": lpba8[n],
            "fixed_labels": fixed_lab,
            "moving_labels": lpba8[n + "_labels"],
        }
        for n in ("S35", "S36")
    ]
    pert = RandomPerturbation("affine", rotation=10, translation=2, scale=0.1, shear=0.05)
    data = PerturbedPairs(train, pert, seed=0, length=10**6)
    held = collate_pairs([PerturbedPairs(test, pert, seed=99, length=8)[i] for i in range(8)])
    torch.manual_seed(0)
    m = DLIR(3, bspline_spacings=(4,), **SMALL)
    step = 0
    for stage, steps, lr in ((0, 100, 3e-3), (1, 50, 1e-3)):
        m.set_trainable_stages([stage])
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
        m.train()
        for _ in range(steps):
            b = collate_pairs([data[step * 4 + i] for i in range(4)])
            terms = m.loss(b, m(b.fixed, b.moving))
            opt.zero_grad()
            terms["total"].backward()
            opt.step()
            step += 1
    out = m.predict(held.fixed, held.moving)
    stage_warped = out.extras["stage_warped"]
    cc0 = -float(ncc(held.fixed, held.moving))
    cc_affine = -float(ncc(held.fixed, stage_warped[:, :1]))
    cc_bspline = -float(ncc(held.fixed, stage_warped[:, 1:]))
    affine_only = out.transform.transforms[-1].voxel_displacement(out.grid)
    d0 = _dice(held, torch.zeros_like(out.displacement))
    d_affine, d_bspline = _dice(held, affine_only), _dice(held, out.displacement)
    # measured (1 thread, seeds 0 / 1 / 2 of data and weights): NCC 0.77 → 0.91 / 0.92 / 0.87
    # → 0.92 / 0.94 / 0.91, Dice 0.19 → 0.29 / 0.33 / 0.24 → 0.32 / 0.37 / 0.30; smallest
    # gains over the three seeds: NCC +0.10 and +0.016, Dice +0.056 and +0.023
    assert cc_affine > cc0 + 0.06 and cc_bspline > cc_affine + 0.008
    assert d_affine > d0 + 0.03 and d_bspline > d_affine + 0.01


# ---------------------------------------------------------------------------- issue-11 proof
def test_staged_training_then_register_oblique_pair_replays_in_simpleitk(data_root, tmp_path):
    """`learnreg train` a tiny 2D DLIR stage by stage, as the paper does (the affine stage,
    then the B-spline stage started from its checkpoint with the affine frozen), on real
    slices moved by random affine transforms (the ``perturb`` source, atlas r16slice); then
    `learnreg register --model` a pair given at another spacing and an oblique direction
    writes an ITK matrix (the affine stage) and a displacement field (the B-spline stage)
    that SimpleITK replays."""
    from learnreg.train.checkpoint import load_checkpoint

    from ._roundtrip import oblique_slices, register_and_replay, train

    slices = data_root / "ants2d"
    method_config = {
        "ndim": 2,
        "bspline_spacings": [8],
        "affine_features": 4,
        "affine_hidden": [8],
        "affine_downsamplings": 3,
        "bspline_features": 4,
        "bspline_layers": 3,
    }
    base = {
        "method": "dlir",
        "data": {
            "synthetic": {
                "kind": "perturb",
                "images": str(slices),
                "atlas": "r16slice",
                "train": ["r27slice", "r30slice", "r62slice", "r64slice"],
                "transform": "affine",
                "rotation": 10,
                "translation": 3,
                "length": 200,
            },
            "spacing": [4, 4],
            "levels": 0,
        },
        "steps": 8,
        "batch_size": 2,
    }
    affine = train(
        {
            **base,
            "method_config": {**method_config, "trainable_stages": [0]},
            "optimizer": {"lr": 3e-3},
        },
        tmp_path / "affine",
    )
    ckpt = train(
        {
            **base,
            "method_config": {**method_config, "trainable_stages": [1]},
            "optimizer": {"lr": 1e-2},
            "init": str(affine),
        },
        tmp_path / "bspline",
    )
    first, second = load_checkpoint(affine)["model"], load_checkpoint(ckpt)["model"]
    for k, v in first.items():  # the frozen affine stage kept the first run's weights
        if k.startswith("affine_net."):
            assert torch.equal(v, second[k]), k
    assert any(not torch.equal(v, second[k]) for k, v in first.items() if "bspline" in k)
    report = register_and_replay(ckpt, *oblique_slices(data_root, "r64slice"), tmp_path / "out")
    files = report["manifest"]["files"]
    assert "affine" in files and "warp" in files
    assert report["matrix_error"] <= 1e-5, report["matrix_error"]
    from learnreg.io.result import load_result

    a = load_result(tmp_path / "out").affine.homogeneous()[0].double()
    assert (a - torch.eye(3, dtype=a.dtype)).abs().max() > 1e-3  # the affine stage moved
    assert report["max_warp_mm"] > 0.02  # and so did the B-spline stage (from zero)
    print(
        f"MAD {report['mad']:.2e}, matrix error {report['matrix_error']:.1e}, "
        f"max |A − I| {float((a - torch.eye(3, dtype=a.dtype)).abs().max()):.3f}, "
        f"max |u| {report['max_warp_mm']:.2f} mm"
    )
