"""fan-adversarial (Fan et al. 2018): the discriminator's inputs and groups, and training on
real LPBA40 slices through the project's Trainer (atlas S01 ← S11–S22; validation S35–S38,
never trained on; no labels in training, Dice of the 56 structures only to score).

Exact resume of both networks and both optimizers after a kill, with an update ratio."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learnreg.methods.base import RegistrationBatch
from learnreg.methods.fan_adversarial import AdversarialSimilarityNetwork
from learnreg.methods.registry import create_method, method_info
from learnreg.train.checkpoint import load_checkpoint
from learnreg.train.config import TrainConfig
from learnreg.train.trainer import Trainer, build_datasets

from .._lpba_slices import write_slice_folders

SMALL = {"ndim": 2, "enc_features": [16, 32, 32], "dec_features": [32, 32, 32, 16]}
TRAIN = [f"S{i}" for i in range(11, 23)]
VAL = ["S35", "S36", "S37", "S38"]


@pytest.fixture(scope="module")
def slices(lpba: Path, tmp_path_factory) -> Path:
    return write_slice_folders(lpba, ["S01", *TRAIN, *VAL], tmp_path_factory.mktemp("slices"))


def config(slices: Path, out: Path, **kw) -> TrainConfig:
    d = {
        "method": "fan-adversarial",
        "method_config": SMALL,
        "data": {
            "images": str(slices / "images"),
            "labels": str(slices / "labels"),
            "atlas": "S01",
            "train": TRAIN,
            "val": VAL,
            "shape": [80, 96],
            "levels": 3,
        },
        "optimizer": {"lr": 1e-3, "groups": {"discriminator": {"lr": 1e-4, "every": 2}}},
        "batch_size": 4,
        "output": str(out),
        "progress": False,
        "device": "cpu",
    }
    d.update(kw)
    return TrainConfig.from_dict(d)


def test_registered_with_table_attributes_and_two_groups() -> None:
    info = method_info("fan2018")
    assert info.name == "fan-adversarial" and info.cls is AdversarialSimilarityNetwork
    assert "adversarial" in info.loss and info.supervision.startswith("unsupervised")
    m = create_method("fan-adversarial", **SMALL)
    groups = m.parameter_groups()
    assert list(groups) == ["model", "discriminator"]
    assert {id(p) for p in groups["discriminator"]} == {id(p) for p in m.discriminator.parameters()}
    assert not {id(p) for p in groups["model"]} & {id(p) for p in groups["discriminator"]}
    clone = type(m)(**m.config)
    clone.load_state_dict(m.state_dict())
    assert clone.config["regularization"] == {"diffusion": 10.0}


def test_losses_and_what_each_network_learns_from() -> None:
    torch.manual_seed(0)
    m = create_method("fan-adversarial", **SMALL, positive_noise=0.0)
    with torch.no_grad():
        m.flow.conv.weight.normal_(0, 0.01)
    fixed, moving = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    out = m(fixed, moving)
    terms = m.loss(RegistrationBatch(fixed, moving), out)
    assert {"adversarial", "diffusion", "discriminator", "total", "total_discriminator"} <= set(
        terms
    )
    torch.testing.assert_close(terms["total"], terms["adversarial"] + 10.0 * terms["diffusion"])
    # the positive pair is the fixed image blended with the warped one (α = 0.8)
    torch.testing.assert_close(m.positive(fixed, out.warped), 0.8 * fixed + 0.2 * out.warped)
    # the discriminator's loss never reaches the generator (its negatives are detached)
    grads = torch.autograd.grad(
        terms["total_discriminator"], list(m.unet.parameters()), allow_unused=True
    )
    assert all(g is None for g in grads)
    # the generator's loss reaches the generator through the discriminator's judgement
    g = torch.autograd.grad(terms["adversarial"], m.flow.conv.weight, retain_graph=True)[0]
    assert float(g.abs().max()) > 0


def test_training_aligns_validation_pairs(slices: Path, tmp_path: Path) -> None:
    """Measured (seeds 0–2, 200 steps of batch 4, ~20 s): validation Dice 0.351 (identity,
    which the untrained network gives) → 0.400 / 0.405 / 0.400 (0.405 / 0.389 / 0.400 with
    a discriminator update every step); unsupervised VoxelMorph (LNCC) in the same set-up
    reaches 0.412."""
    cfg = config(slices, tmp_path, steps=200, val_every=200, checkpoint_every=200)
    torch.manual_seed(0)
    method = create_method("fan-adversarial", **SMALL)
    trainer = Trainer(cfg, method, *build_datasets(cfg))
    untrained = trainer.validate()["val_dice"]
    summary = trainer.fit()
    identity = summary["identity_dice"]
    assert untrained == pytest.approx(identity, abs=1e-3)  # the untrained network: identity
    assert summary["validation"]["val_dice"] > identity + 0.02, summary
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert {"adversarial", "discriminator", "total_discriminator"} <= set(log[0].split(","))


def test_resume_after_kill_restores_both_networks_exactly(slices: Path, tmp_path: Path) -> None:
    """A run killed at step 3 and resumed ends with the same generator, discriminator and
    optimizer states as one that never stopped; the generator steps every 2nd step."""
    small = {**SMALL, "enc_features": [4, 8, 8], "dec_features": [8, 8, 8, 4]}

    def run(out: Path, crash_at: int | None = None, resume: bool = False, seed: int = 0):
        cfg = config(
            slices,
            out,
            method_config=small,
            steps=6,
            checkpoint_every=1,
            val_every=10**6,
            batch_size=2,
            optimizer={"lr": 1e-3, "groups": {"model": {"every": 2}}},
        )
        torch.manual_seed(seed)
        m = create_method("fan-adversarial", **small)

        class Killed(RuntimeError):
            pass

        def kill(trainer, step, losses):
            if step == crash_at:
                raise Killed

        trainer = Trainer(cfg, m, *build_datasets(cfg), callback=kill if crash_at else None)
        if crash_at:
            with pytest.raises(Killed):
                trainer.fit()
            return m
        trainer.fit(resume=resume)
        return m

    whole = run(tmp_path / "a")
    start = {k: v.clone() for k, v in run(tmp_path / "b", crash_at=3).state_dict().items()}
    resumed = run(tmp_path / "b", resume=True, seed=123)  # other init: weights come from disk
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert set(a["optimizer"]) == {"model", "discriminator"}
    for group in ("model", "discriminator"):
        for sa, sb in zip(
            a["optimizer"][group]["state"].values(),
            b["optimizer"][group]["state"].values(),
            strict=True,
        ):
            torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=0, atol=0)
    # the update ratio: 6 steps, the generator stepped 3 times, the discriminator 6
    assert int(a["optimizer"]["model"]["state"][0]["step"]) == 3
    assert int(a["optimizer"]["discriminator"]["state"][0]["step"]) == 6
    # the killed run had moved both networks: the comparison is not trivially of starts
    moved = [k for k, v in whole.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.startswith("discriminator") for k in moved)
    assert any(not k.startswith("discriminator") for k in moved)
