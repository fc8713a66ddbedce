"""Mahapatra et al. 2018 (cycle-consistent GAN registration): registry, parameter groups, loss
terms, gradients by group through the trainer, and training through the project's Trainer on
real LPBA40 axial slices (atlas S01, training subjects S11–S22), scored by SSIM and label Dice
on S35–S38 (validation subjects, never trained on; labels never used in training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learnreg.data.datasets import collate_pairs
from learnreg.losses.adversarial import discriminator_loss, generator_loss
from learnreg.losses.functional import l1, mutual_information, ssim
from learnreg.methods.base import RegistrationBatch
from learnreg.methods.mahapatra_gan import MahapatraGAN
from learnreg.methods.registry import create_method, method_info
from learnreg.nn.features import feature_distance
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.sampling import warp
from learnreg.train.config import TrainConfig
from learnreg.train.trainer import Trainer, build_datasets

from .._lpba_slices import write_slice_folders

SMALL = {
    "enc_features": [8, 16, 16],
    "dec_features": [16, 16, 16, 8],
    "discriminator_features": [8, 16, 32],
    "feature_features": [8, 16],
}
FAST = {**SMALL, "content": {"nmi": {"samples": 2048}, "ssim": 1.0}}
"""The training test's scale: small networks, NMI on 2048 random voxels per call."""
TRAIN = [f"S{i}" for i in range(11, 23)]
VAL = ["S35", "S36", "S37", "S38"]


@pytest.fixture(scope="module")
def slices(lpba, tmp_path_factory) -> Path:
    """The middle axial slices of the atlas, training and validation subjects as 2D NIfTI
    images and label maps (1 mm)."""
    return write_slice_folders(lpba, ["S01", *TRAIN, *VAL], tmp_path_factory.mktemp("slices"))


def config(root: Path, out: Path, steps: int, seed: int = 0, **optimizer) -> TrainConfig:
    data = {"images": str(root / "images"), "labels": str(root / "labels"), "atlas": "S01"}
    data.update({"train": TRAIN, "val": VAL, "shape": [80, 96], "levels": 3})
    return TrainConfig.from_dict(
        {
            "method": "mahapatra-gan",
            "method_config": {"ndim": 2, **FAST},
            "data": data,
            "optimizer": {"lr": 1e-3, **optimizer},
            "steps": steps,
            "batch_size": 4,
            "val_every": steps,
            "checkpoint_every": 10**6,
            "log_every": steps,
            "output": str(out),
            "progress": False,
            "device": "cpu",
            "seed": seed,
        }
    )


def test_registered_with_table_attributes() -> None:
    info = method_info("mahapatra2018")
    assert info.name == "mahapatra-gan" and info.cls is MahapatraGAN and info.year == 2018
    assert (info.ndim, info.transform) == ("2D/3D", "dense displacement")
    assert info.supervision == "unsupervised (adversarial)"
    assert info.reference == "Mahapatra et al., ISBI 2018"
    assert all(w in info.loss for w in ("adversarial", "NMI", "SSIM", "cycle"))


def _ids(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def test_parameter_groups_partition_the_networks() -> None:
    m = create_method("mahapatra-gan", ndim=2, **SMALL)
    groups = m.parameter_groups()
    assert list(groups) == ["model", "discriminator", "features"]
    ids = {k: {id(p) for p in v} for k, v in groups.items()}
    assert ids["model"] == _ids(m.generator) | _ids(m.inverse_generator)
    assert ids["discriminator"] == _ids(m.discriminator_fixed) | _ids(m.discriminator_moving)
    assert ids["features"] == _ids(m.features)
    assert sum(len(v) for v in ids.values()) == len(_ids(m))  # disjoint, and all of them
    # without the feature term there is no feature network and no "features" group
    m0 = create_method("mahapatra-gan", ndim=2, feature_weight=0.0, **SMALL)
    assert m0.features is None and list(m0.parameter_groups()) == ["model", "discriminator"]
    assert "total_features" not in m0.loss(*_batch_and_output(m0, 2))


def _batch_and_output(m: MahapatraGAN, ndim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (16,) * ndim
    fixed, moving = torch.rand(2, 1, *shape, generator=g), torch.rand(2, 1, *shape, generator=g)
    batch = RegistrationBatch(fixed, moving)
    return batch, m(fixed, moving)


def _constant_field(generator: torch.nn.Module, shift: list[float]) -> None:
    """Make a generator output the constant displacement ``shift`` (voxels)."""
    with torch.no_grad():
        generator.flow.conv.weight.zero_()
        generator.flow.conv.bias.copy_(torch.tensor(shift))


@pytest.mark.parametrize("ndim,kind", [(2, "bce"), (3, "lsgan")])
def test_forward_output_and_loss_terms(ndim: int, kind: str) -> None:
    torch.manual_seed(0)
    m = create_method(
        "mahapatra-gan",
        ndim=ndim,
        adversarial=kind,
        adversarial_weight=0.5,
        cycle_weight=2.0,
        feature_weight=0.7,
        regularization={"diffusion": 0.3},
        **SMALL,
    )
    batch, out = _batch_and_output(m, ndim)
    assert isinstance(out.transform, DisplacementField)
    assert torch.equal(out.displacement, out.extras["field"])
    torch.testing.assert_close(out.warped, warp(batch.moving, out.displacement))
    terms = m.loss(batch, out)
    assert set(terms) == {
        "nmi", "ssim", "features", "content", "adversarial", "cycle", "diffusion", "total",
        "discriminator", "total_discriminator", "reconstruction", "total_features",
    }  # fmt: skip
    t = {k: float(v.detach()) for k, v in terms.items()}
    assert t["content"] == pytest.approx(t["nmi"] + t["ssim"] + 0.7 * t["features"], rel=1e-5)
    want = t["content"] + 0.5 * t["adversarial"] + 2.0 * t["cycle"] + 0.3 * t["diffusion"]
    assert t["total"] == pytest.approx(want, rel=1e-5)
    assert -2 <= t["nmi"] <= -1 and 0 <= t["features"] <= 4

    # both generators at the identity: every term against the losses computed directly
    for gen in (m.generator, m.inverse_generator):
        _constant_field(gen, [0.0] * ndim)
    f, mv = batch.fixed, batch.moving
    with torch.no_grad():
        terms = m.loss(batch, m(f, mv))
        # content in both directions; NMI and SSIM are symmetric in their two images
        assert float(terms["nmi"]) == pytest.approx(
            float(mutual_information(f, mv, normalized=True)), rel=1e-5
        )
        assert float(terms["ssim"]) == pytest.approx(float(ssim(f, mv)), rel=1e-5)
        enc = m.features.encoder
        d = 0.5 * (feature_distance(enc, f, mv) + feature_distance(enc, mv, f))
        assert float(terms["features"]) == pytest.approx(float(d), rel=1e-5)
        assert float(terms["cycle"]) < 1e-5 and float(terms["diffusion"]) == 0.0  # rounding
        real_fake = [(m.discriminator_fixed, f, mv), (m.discriminator_moving, mv, f)]
        want_d = sum(discriminator_loss(D(a), D(b), kind) for D, a, b in real_fake)
        assert float(terms["total_discriminator"]) == pytest.approx(float(want_d), rel=1e-5)
        want_g = sum(generator_loss(D(b), kind) for D, _, b in real_fake)
        assert float(terms["adversarial"]) == pytest.approx(float(want_g), rel=1e-5)
        rec = (m.features(torch.cat([f, mv])) - torch.cat([f, mv])).abs().mean()
        assert float(terms["total_features"]) == pytest.approx(float(rec), rel=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_cycle_vanishes_exactly_when_the_inverse_generator_inverts(ndim: int) -> None:
    m = create_method("mahapatra-gan", ndim=ndim, feature_weight=0.0, **SMALL)
    batch, _ = _batch_and_output(m, ndim)
    shift = [2.0, -1.0, 1.0][:ndim]
    _constant_field(m.generator, shift)
    _constant_field(m.inverse_generator, [-s for s in shift])  # G's inverse: cycle is zero
    with torch.no_grad():
        assert float(m.loss(batch, m(batch.fixed, batch.moving))["cycle"]) < 1e-6
        _constant_field(m.inverse_generator, shift)  # not the inverse: twice the shift back
        cycle = m.loss(batch, m(batch.fixed, batch.moving))["cycle"]
        twice = (
            torch.tensor([2 * s for s in shift])
            .view(1, ndim, *[1] * ndim)
            .expand(2, ndim, *[16] * ndim)
        )
        want = l1(batch.moving, warp(batch.moving, twice)) + l1(
            batch.fixed, warp(batch.fixed, twice)
        )
        assert float(cycle) == pytest.approx(float(want), rel=1e-5) and float(cycle) > 0.1


def test_each_total_reaches_only_its_own_group() -> None:
    """Autograd paths of the three totals: the discriminators' and the auto-encoder's losses
    have none into other groups; the generators' total runs through the discriminators (the
    trainer's grouping keeps it out of their weights) but not into the feature network (the
    feature distance uses detached weights)."""
    m = create_method("mahapatra-gan", ndim=2, **SMALL)
    terms = m.loss(*_batch_and_output(m, 2))
    groups = m.parameter_groups()

    def reached(total: str, group: str) -> bool:
        grads = torch.autograd.grad(
            terms[total], groups[group], retain_graph=True, allow_unused=True
        )
        return any(g is not None and bool(g.abs().sum() > 0) for g in grads)

    reach = {
        (t, g): reached(t, g)
        for t in ("total", "total_discriminator", "total_features")
        for g in groups
    }
    assert reach == {
        ("total", "model"): True,
        ("total", "discriminator"): True,
        ("total", "features"): False,
        ("total_discriminator", "model"): False,
        ("total_discriminator", "discriminator"): True,
        ("total_discriminator", "features"): False,
        ("total_features", "model"): False,
        ("total_features", "discriminator"): False,
        ("total_features", "features"): True,
    }


def test_trainer_puts_each_total_into_its_own_group(slices, tmp_path) -> None:
    """Three Trainer steps where the groups step on different steps (``every``): a group's
    weights get gradients only on its own steps, so the generators' adversarial term never
    reaches the discriminators and the discriminators' loss never reaches the generators."""
    groups = {"model": {"every": 2}, "discriminator": {"every": 3}}
    cfg = config(slices, tmp_path / "run", steps=3, groups=groups)
    torch.manual_seed(0)
    m = create_method("mahapatra-gan", ndim=2, **FAST)
    seen: list[dict[str, bool]] = []

    def record(trainer, step, losses) -> None:
        seen.append(
            {
                name: any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
                for name, params in m.parameter_groups().items()
            }
        )

    train, val = build_datasets(cfg)
    Trainer(cfg, m, train, val, callback=record).fit(overwrite=True)
    assert seen == [
        {"model": False, "discriminator": False, "features": True},
        {"model": True, "discriminator": False, "features": True},
        {"model": False, "discriminator": True, "features": True},
    ]


def test_training_improves_ssim_and_dice_over_the_identity(slices, tmp_path) -> None:
    """Trainer, STEPS steps of batch 4 from an untrained network (the identity: it scores
    the identity's Dice and SSIM), then the last weights on the four validation pairs.

    Measured, 120 steps (identity: Dice 0.351, SSIM 0.553), seeds 0 / 1 / 2 / 3 / 4: Dice
    0.380 / 0.379 / 0.385 / 0.382 / 0.379 (+0.028 to +0.034), SSIM 0.687 / 0.664 / 0.698 /
    0.697 / 0.644 (+0.091 to +0.145); 27–50 s each on one thread of a shared 2-core machine.
    The margins are half the smallest gains.
    """
    cfg = config(slices, tmp_path / "run", steps=STEPS, seed=SEED)
    train, val = build_datasets(cfg)
    vb = collate_pairs([val[i] for i in range(len(val))], val.grid)
    torch.manual_seed(SEED)
    m = create_method("mahapatra-gan", ndim=2, **FAST)

    def scores() -> tuple[dict[str, float], float, float]:
        out = m.predict(vb.fixed, vb.moving, vb.grid)
        s_reg, s_id = (1 - float(ssim(vb.fixed, x)) for x in (out.warped, vb.moving))
        return m.validate(vb, out), s_reg, s_id

    (untrained, ssim_untrained, ssim_identity) = scores()
    assert untrained["dice"] == pytest.approx(untrained["identity_dice"], abs=1e-3)
    assert ssim_untrained == pytest.approx(ssim_identity, abs=1e-3)
    Trainer(cfg, m, train, val).fit(overwrite=True)
    trained, ssim_trained, _ = scores()
    identity = trained["identity_dice"]
    assert trained["dice"] > identity + DICE_MARGIN, (trained, identity)
    assert ssim_trained > ssim_identity + SSIM_MARGIN, (ssim_trained, ssim_identity)


STEPS = 120
SEED = 0
DICE_MARGIN = 0.014
SSIM_MARGIN = 0.045


def test_bad_configurations_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="adversarial must be one of"):
        create_method("mahapatra-gan", ndim=2, adversarial="wgan", **SMALL)
    with pytest.raises(ValueError, match="cycle_weight must be finite and >= 0"):
        create_method("mahapatra-gan", ndim=2, cycle_weight=-1.0, **SMALL)
    with pytest.raises(ValueError, match="adversarial_weight must be finite and > 0"):
        create_method("mahapatra-gan", ndim=2, adversarial_weight=0.0, **SMALL)
    with pytest.raises(ValueError, match="content loss is empty"):
        create_method("mahapatra-gan", ndim=2, content={}, feature_weight=0.0, **SMALL)
    with pytest.raises(ValueError, match="taken by the method's own terms"):
        create_method("mahapatra-gan", ndim=2, content={"cycle": {"loss": "ssim"}}, **SMALL)
    with pytest.raises(ValueError, match="ndim must be one of"):
        create_method("mahapatra-gan", ndim=4, **SMALL)
    m = create_method("mahapatra-gan", ndim=2, **SMALL)
    with pytest.raises(ValueError, match=r"\(N, 1, \*S\) with 2 spatial dims"):
        m(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 8))


def test_train_then_register_oblique_pair_replays_in_simpleitk(data_root, tmp_path) -> None:
    """Issue 11 proof: `learnreg train` a tiny model on real slices (its checkpoint rebuilds
    the method from the saved config, all groups included), `learnreg register --model` a
    pair at another spacing and an oblique direction, SimpleITK replays it."""
    from ._roundtrip import oblique_slices, register_and_replay, train

    small = {**SMALL, "enc_features": [8, 16], "dec_features": [16, 16, 8]}
    config = {
        "method": "mahapatra-gan",
        "method_config": {"ndim": 2, **small},
        "data": {"images": str(data_root / "ants2d"), "shape": [64, 64], "levels": 2},
        "optimizer": {"lr": 1e-2},
        "steps": 10,
        "batch_size": 2,
    }
    ckpt = train(config, tmp_path / "train")
    report = register_and_replay(ckpt, *oblique_slices(data_root, "r64slice"), tmp_path / "out")
    assert report["manifest"]["info"]["transform"] == "DisplacementField"
    assert report["max_warp_mm"] > 1.0  # a real deformation (mm), not the identity
