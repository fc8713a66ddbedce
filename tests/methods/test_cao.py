"""Cao et al.'s inter-modality network trained by intra-modality similarity: T1 → T2-like
LPBA40 slices (atlas S01 in T2-like contrast, training subjects' T1), the loss comparing only
images of one modality; scored by label Dice on S35–S38 (validation subjects, never trained
on; labels never used in training)."""

from __future__ import annotations

import pytest
import torch

from learnreg.data.datasets import collate_pairs
from learnreg.data.modalities import ModalityPairs, second_modality
from learnreg.losses.functional import ncc
from learnreg.methods.base import RegistrationBatch
from learnreg.methods.cao import CaoIntraModality
from learnreg.methods.registry import create_method, method_info
from learnreg.spatial.sampling import warp

from .._lpba_slices import axial_slices, on_network_grid

SMALL = {"enc_features": [8, 16, 16], "dec_features": [16, 16, 16, 8]}
TRAIN = [f"S{i}" for i in range(11, 19)]
VAL = ["S35", "S36", "S37", "S38"]


@pytest.fixture(scope="module")
def pairs(lpba):
    images, labels = axial_slices(lpba, ["S01", *TRAIN, *VAL])
    t1, grid, pre = on_network_grid(images)
    t2 = {n: pre.image(second_modality(im), grid) for n, im in images.items()}
    both = {"t1": t1, "t2-like": t2}
    train = ModalityPairs(both, labels, "S01", TRAIN, "t1", grid, pre)
    val = ModalityPairs(both, labels, "S01", VAL, "t1", grid, pre)
    return train, val


def test_registered_with_table_attributes() -> None:
    info = method_info("cao2017")
    assert info.name == "cao-intermodality" and info.cls is CaoIntraModality
    assert "ncc" in info.loss.lower() and "unsupervised" in info.supervision


@pytest.mark.parametrize("dual", [True, False])
@pytest.mark.parametrize("ndim", [2, 3])
def test_loss_compares_only_images_of_one_modality(ndim, dual) -> None:
    m = create_method("cao-intermodality", ndim=ndim, dual=dual, reg_weight=0.0, **SMALL)
    shape = (16,) * ndim
    g = torch.Generator().manual_seed(0)
    fixed, moving, target = (torch.rand(2, c, *shape, generator=g) for c in (1, 1, 2))
    out = m(fixed, moving)
    assert out.displacement.shape == (2, ndim, *shape)
    terms = m.loss(RegistrationBatch(fixed, moving, target=target), out)
    with torch.no_grad():
        d = out.displacement
        want = ncc(target[:, :1], warp(moving, d))
        if dual:
            want = 0.5 * (want + ncc(fixed, warp(target[:, 1:], d)))
    assert float(terms["similarity"].detach()) == pytest.approx(float(want), rel=1e-5)
    # the fixed/moving pair itself (two modalities) does not enter the moving side's term
    other = m.loss(RegistrationBatch(fixed, torch.rand_like(moving), target=target), out)
    if not dual:
        assert float(other["similarity"].detach()) == pytest.approx(float(want), rel=1e-5)


def test_batch_without_counterparts_names_the_data_source() -> None:
    m = create_method("cao-intermodality", ndim=2, **SMALL)
    fixed = moving = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="modality-pairs"):
        m.loss(RegistrationBatch(fixed, moving), m(fixed, moving))
    with pytest.raises(ValueError, match=r"\(1, 2, 16, 16\)"):
        m.loss(RegistrationBatch(fixed, moving, target=torch.rand(1, 1, 16, 16)), m(fixed, moving))


def test_training_on_t1_to_t2_like_slices_improves_dice(pairs) -> None:
    train, val = pairs
    torch.manual_seed(0)
    m = create_method("cao-intermodality", ndim=2, **SMALL)
    vb = collate_pairs([val[i] for i in range(len(val))], val.grid)

    def dice() -> dict:
        m.eval()
        with torch.no_grad():
            scores = m.validate(vb, m(vb.fixed, vb.moving, vb.grid))
        m.train()
        return scores

    untrained = dice()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        b = collate_pairs(
            [train[i] for i in torch.randint(len(train), (4,), generator=g)], train.grid
        )
        loss = m.loss(b, m(b.fixed, b.moving, b.grid))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = dice()
    identity = trained["identity_dice"]
    assert abs(untrained["dice"] - identity) < 0.005  # an untrained network is the identity
    assert trained["dice"] > identity + MARGIN, (trained, identity)


STEPS = 400
MARGIN = 0.02


def test_train_then_register_t1_to_t2_like_replays_in_simpleitk(data_root, tmp_path):
    """`learnreg train` on the modality-pairs source (LPBA40 at 16×24×16), then `learnreg
    register --model` an oblique T2-like fixed / T1 moving pair at other spacings; SimpleITK
    replays the warp."""
    from learnreg.data.modalities import second_modality
    from learnreg.io.images import read_image
    from learnreg.train.checkpoint import load_checkpoint

    from ._roundtrip import oblique, register_and_replay, train

    config = {
        "method": "cao-intermodality",
        "method_config": {"ndim": 3, **SMALL},
        "data": {
            "shape": [16, 24, 16],
            "synthetic": {"kind": "modality-pairs", "subjects": ["S11"], "val_subjects": ["S35"]},
        },
        "optimizer": {"lr": 1e-3},
        "steps": 4,
        "batch_size": 1,
        "val_every": 2,
    }
    ckpt = train(config, tmp_path / "train")
    assert load_checkpoint(ckpt)["extra"]["best_key"] == "dice"
    lpba = data_root / "lpba40" / "images"
    fixed = oblique(second_modality(read_image(lpba / "S35.nii.gz")), (6.0, 7.0, 5.0), 15.0, "f")
    moving = oblique(read_image(lpba / "S36.nii.gz"), (5.0, 6.5, 7.5), -10.0, "m")
    report = register_and_replay(ckpt, fixed, moving, tmp_path / "out")
    assert "warp" in report["manifest"]["files"]
    assert report["max_warp_mm"] > 0.01
