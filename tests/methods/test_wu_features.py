"""Wu et al. 2016: the stacked sparse auto-encoder of importance-sampled patches, its dense
attribute vectors, HAMMER-like hierarchical matching, and registration of real 2D brain
slices (:mod:`._brain_slices`; the auto-encoder trained on patches of r16, r27, r30, r62,
r64 only, no labels anywhere in training; scored on the four pairs with r85)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learnreg.core.errors import InputError
from learnreg.methods.registry import create_method, method_info
from learnreg.methods.wu_features import (
    WuFeatures,
    importance_map,
    normalize_intensity,
    sample_centres,
)
from learnreg.nn.stacked_autoencoder import StackedSparseAutoencoder, extract_patches
from learnreg.spatial.feature_matching import MatchingLevel, driving_voxels
from learnreg.spatial.sampling import warp

from ._brain_slices import TRAIN, evaluate, load_slices, mean, stack


@pytest.fixture(scope="module")
def slices(data_root: Path):
    return load_slices(data_root)


def test_registered_with_table_attributes() -> None:
    info = method_info("wu2016")
    assert info.name == "wu-features" and info.cls is WuFeatures
    assert "unsupervised" in info.supervision and "auto-encoder" in info.loss


@pytest.mark.parametrize("ndim", [2, 3])
def test_dense_codes_are_the_codes_of_each_voxels_patch(ndim) -> None:
    torch.manual_seed(0)
    sae = StackedSparseAutoencoder(ndim, 5, hidden=(6, 3))
    shape = (9, 8, 7)[:ndim]
    images = torch.rand(2, 1, *shape)
    centres = torch.stack([torch.randint(s, (2, 10)) for s in shape], -1)
    centres[0, 0] = 0  # a patch over the border: zero outside the image
    patches = extract_patches(images, centres, 5)
    # the patch is the plain crop of the zero-padded image
    c = centres[1, 3]
    pad = torch.nn.functional.pad(images, [2, 2] * ndim)
    crop = pad[(1, 0, *[slice(int(i), int(i) + 5) for i in c])]
    assert torch.equal(patches[10 + 3], crop.reshape(-1))
    dense = sae.dense_codes(images)
    assert dense.shape == (2, 3, *shape)
    picked = torch.stack(
        [dense[(n, slice(None), *centres[n, j].tolist())] for n in range(2) for j in range(10)]
    )
    torch.testing.assert_close(picked, sae.encode(patches)[-1], rtol=1e-5, atol=1e-5)


def test_layerwise_terms_train_only_their_own_layer() -> None:
    torch.manual_seed(0)
    sae = StackedSparseAutoencoder(2, 3, hidden=(5, 4))
    terms = sae.losses(torch.rand(16, 9), fine_tune=0.0)
    assert set(terms) >= {"reconstruction_1", "sparsity_2", "weight_decay", "total"}
    (terms["reconstruction_2"] + terms["sparsity_2"]).backward()
    assert sae.encoders[0].weight.grad is None  # layer 2's terms see a detached input
    assert float(sae.encoders[1].weight.grad.abs().sum()) > 0
    terms = sae.losses(torch.rand(16, 9), fine_tune=1.0)
    terms["reconstruction"].backward()  # fine-tuning reaches the bottom layer
    assert float(sae.encoders[0].weight.grad.abs().sum()) > 0


def test_patches_are_importance_sampled(slices) -> None:
    x = normalize_intensity(next(stack(TRAIN[:2], slices)))
    imp = importance_map(x)
    centres = sample_centres(imp, 2000, generator=torch.Generator().manual_seed(0))
    picked = torch.stack([imp[n, 0][tuple(centres[n].T)] for n in range(2)])
    # measured 2.9x the image mean; uniform sampling would give 1x
    assert float(picked.mean()) > 2.0 * float(imp.mean())


def test_driving_voxels_grow_with_the_fraction() -> None:
    imp = torch.arange(100.0).reshape(1, 1, 10, 10)
    few, more = driving_voxels(imp, 0.05), driving_voxels(imp, 0.3)
    assert int(few.sum()) == 5 and int(more.sum()) == 30
    assert bool(few[0, 0, 9, 5:].all()) and bool((more | ~few).all())
    with pytest.raises(ValueError, match="fraction"):
        MatchingLevel(0.0, 2, 1, 1.0, 1)


def test_matching_recovers_a_known_shift_of_a_real_slice(slices) -> None:
    fixed = slices["r16"][0]
    m = create_method("wu-features", ndim=2)
    assert float(m.predict(fixed, fixed).displacement.abs().max()) == 0.0
    u0 = torch.zeros(1, 2, 64, 64)
    u0[:, 0], u0[:, 1] = 2.0, -3.0
    moving = warp(fixed, -u0)  # fixed(x) = moving(x + u0)
    out = m.predict(fixed, moving)
    centre = out.displacement[0, :, 16:48, 16:48].mean((1, 2))
    assert torch.allclose(centre, u0[0, :, 0, 0], atol=0.5), centre
    assert float((out.warped - fixed).abs().mean()) < 0.5 * float((moving - fixed).abs().mean())


def test_bad_input_is_named() -> None:
    m = create_method("wu-features", ndim=2)
    with pytest.raises(InputError, match="constant"):
        m.predict(torch.ones(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(N, 1, \*S\)"):
        m.predict(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 17))
    with pytest.raises(ValueError, match="odd patch"):
        create_method("wu-features", ndim=2, patch=4)
    with pytest.raises(ValueError, match="levels"):
        create_method("wu-features", ndim=2, levels=[])


def _train(m: WuFeatures, slices, steps: int, seed: int) -> WuFeatures:
    """Adam on the auto-encoder's loss over importance-sampled patches of training slices."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    for _ in range(steps):
        images, _ = stack(
            [TRAIN[int(i)] for i in torch.randint(len(TRAIN), (4,), generator=gen)], slices
        )
        terms = m.loss(None, m(images[:2], images[2:]))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    return m


def _held_out_reconstruction(m: WuFeatures, slices) -> float:
    torch.manual_seed(1)
    with torch.no_grad():
        patches = m.training_patches(slices["r85"][0])
        return float((m.autoencoder.reconstruct(patches) - patches).square().mean())


def test_learned_features_register_unseen_brain_slices(slices) -> None:
    """300 steps of auto-encoder training (6-15 s here), then HAMMER-like matching of the four pairs
    with r85 (never trained on). Measured, seeds 0-2 (``torch.manual_seed`` and the pair
    generator): tissue Dice 0.591 → 0.701 / 0.711 / 0.714 (+0.110 / +0.120 / +0.123; the
    worst pair +0.065), smallest det J 0.26-0.35, held-out (r85) patch reconstruction error
    0.14-0.16 of the untrained network's.

    Not asserted, because it does not hold on these slices: random (untrained) auto-encoder
    weights give +0.136 / +0.146 / +0.139 with the same matching — random projections of a
    patch are already good attribute vectors, and these tissue labels are intensity classes."""
    torch.manual_seed(0)
    m = create_method("wu-features", ndim=2)
    untrained = _held_out_reconstruction(m, slices)
    torch.manual_seed(0)
    m = _train(m, slices, steps=300, seed=0)
    assert _held_out_reconstruction(m, slices) < 0.4 * untrained
    rows = evaluate(m, slices)
    assert mean(rows, "dice1") > mean(rows, "dice0") + 0.08, rows
    assert all(r["dice1"] > r["dice0"] + 0.03 for r in rows), rows
    assert min(r["detj"] for r in rows) > 0


WARPS = {
    "transform": "dense",
    "images": "both",
    "rotation": 10,
    "translation": 3,
    "field_magnitudes": [2, 1],
}


def test_train_then_register_oblique_pair_replays_in_simpleitk(data_root, tmp_path) -> None:
    """`learnreg train` the auto-encoder (a few steps on real slices), `learnreg register
    --model` a pair of brain slices at another spacing and an oblique direction; SimpleITK
    replays the written warp."""
    from learnreg.train.checkpoint import load_checkpoint

    from ._roundtrip import oblique_slices, register_and_replay, train

    config = {
        "method": "wu-features",
        "method_config": {"ndim": 2, "hidden": [16, 8], "patches_per_image": 64},
        "data": {
            "shape": [64, 64],
            "synthetic": {"kind": "warp", **WARPS, "length": 16, "val_length": 2},
        },
        "optimizer": {"lr": 1e-3},
        "steps": 4,
        "batch_size": 2,
        "val_every": 2,
    }
    ckpt = train(config, tmp_path / "train")
    assert load_checkpoint(ckpt)["extra"]["preprocess"]["network"]["shape"] == [64, 64]
    report = register_and_replay(ckpt, *oblique_slices(data_root), tmp_path / "out")
    assert report["manifest"]["info"]["transform"] == "DisplacementField"
    assert report["max_warp_mm"] > 0.1  # matched, not the identity


def test_3d_matching_recovers_a_known_shift_of_a_real_volume(lpba) -> None:
    """The same on LPBA40 S01 at 8 mm (20×24×20), an untrained 3D network (5³ patches)."""
    from learnreg.data.preprocess import NetworkGrid, Preprocessor
    from learnreg.io.images import read_image

    image = read_image(lpba / "images" / "S01.nii.gz")
    pre = Preprocessor(NetworkGrid(spacing=(8.0,) * 3))
    fixed = pre.image(image, pre.grid_for(image)).batch()
    torch.manual_seed(0)
    m = create_method("wu-features", ndim=3, levels=[[0.1, 2, 1, 2.0, 3], [0.3, 1, 1, 1.5, 3]])
    u0 = torch.zeros(1, 3, *fixed.shape[2:])
    u0[:, 0], u0[:, 2] = 1.0, -1.0
    moving = warp(fixed, -u0)
    out = m.predict(fixed, moving)
    centre = out.displacement[0, :, 6:14, 6:18, 6:14].mean((1, 2, 3))
    # measured (0.65, 0.09, -0.78) for (1, 0, -1): the smoothing at 8 mm shrinks it
    assert torch.allclose(centre, u0[0, :, 0, 0, 0], atol=0.5), centre
    # measured 0.34 of the unregistered error
    assert float((out.warped - fixed).abs().mean()) < 0.6 * float((moving - fixed).abs().mean())
