"""Trainer: exact resume after a crash, validation, outputs, optimizer groups (a tiny VoxelMorph
on 2D slices)."""

from __future__ import annotations

import csv

import pytest
import torch

from learnreg.core.errors import InputError
from learnreg.methods.voxelmorph import VoxelMorph
from learnreg.train.checkpoint import load_checkpoint
from learnreg.train.config import TrainConfig
from learnreg.train.trainer import Trainer, build_datasets

from .conftest import TINY_VXM, tiny_vxm


def _config(ants2d, out, **kw) -> TrainConfig:
    d = {
        "method": "voxelmorph",
        "method_config": TINY_VXM,
        "data": {
            "images": str(ants2d / "images"),
            "labels": str(ants2d / "labels"),
            "atlas": "r16slice",
            "train": ["r27slice", "r30slice", "r62slice", "r64slice", "r85slice"],
            "val": ["r27slice", "r30slice", "r62slice", "r64slice", "r85slice"],
            "shape": [48, 48],
            "levels": 2,
        },
        "optimizer": {"lr": 3e-3},
        "output": str(out),
        "progress": False,
        "device": "cpu",
    }
    d.update(kw)
    return TrainConfig.from_dict(d)


@pytest.fixture(scope="module")
def data(ants2d, tmp_path_factory):
    return build_datasets(_config(ants2d, tmp_path_factory.mktemp("x")))


class Crash(RuntimeError):
    pass


def _run(cfg, data, seed=0, resume=False, crash_at=None):
    torch.manual_seed(seed)
    method = tiny_vxm()

    def cb(trainer, step, losses):
        if step == crash_at:
            raise Crash(f"killed at step {step}")

    trainer = Trainer(cfg, method, *data, callback=cb if crash_at else None)
    return trainer, trainer.fit(resume=resume)


def test_resume_after_kill_is_exact(ants2d, data, tmp_path):
    kw = {
        "steps": 8,
        "batch_size": 2,
        "checkpoint_every": 4,
        "val_every": 4,
        "log_every": 1,
        "optimizer": {"lr": 3e-3, "schedule": "cosine", "min_lr": 1e-4},
        "data": {
            **_config(ants2d, tmp_path).to_dict()["data"],
            "augment": {"rotation": 5, "elastic": 0.5, "gamma": 0.2, "noise": 0.02},
        },
    }
    a, _ = _run(_config(ants2d, tmp_path / "a", **kw), data)
    cfg_b = _config(ants2d, tmp_path / "b", **kw)
    with pytest.raises(Crash):
        _run(cfg_b, data, crash_at=6)  # dies after step 6; last checkpoint is step 4
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 4
    b, summary = _run(cfg_b, data, seed=123, resume=True)  # other init: weights come from disk
    assert summary["step"] == 8
    for (k, va), vb in zip(
        a.method.state_dict().items(), b.method.state_dict().values(), strict=True
    ):
        assert torch.equal(va, vb), k
    sa = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt", expected_method="voxelmorph")
    sb = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt", expected_method="voxelmorph")
    assert sa["step"] == sb["step"] == 8
    for pa, pb in zip(
        sa["optimizer"]["model"]["state"].values(),
        sb["optimizer"]["model"]["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    assert sa["extra"]["best_value"] == sb["extra"]["best_value"]
    assert sa["extra"]["best_key"] == "dice"
    # the log has each step once, and the resumed run's rows continue the killed run's
    with open(tmp_path / "b" / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    # the cosine schedule: lr of the update to step s is that of step s - 1 of 8
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(3e-3)
    assert lrs[4] == pytest.approx(1e-4 + (3e-3 - 1e-4) * 0.5)
    assert lrs == sorted(lrs, reverse=True)
    assert {"total", "similarity", "diffusion", "val_dice", "identity_dice"} <= set(rows[0])
    assert (tmp_path / "b" / "config.yaml").is_file()
    assert (tmp_path / "b" / "checkpoints" / "step_0000008.pt").is_file()
    # resuming a finished run does nothing; another method's checkpoint is refused
    _, again = _run(cfg_b, data, resume=True)
    assert again["step"] == 8
    other = Trainer(_config(ants2d, tmp_path / "b", method="vxm-diff"), tiny_vxm(), *data)
    other.method_name = "voxelmorph-diff"
    with pytest.raises(InputError, match="method 'voxelmorph', expected 'voxelmorph-diff'"):
        other.fit(resume=True)


def test_validation_dice_improves(ants2d, data, tmp_path):
    cfg = _config(ants2d, tmp_path, steps=150, batch_size=2, val_every=50, checkpoint_every=150)
    trainer, summary = _run(cfg, data)
    assert summary["identity_dice"] > 0.3
    assert summary["best_key"] == "dice"
    assert summary["best_value"] > summary["identity_dice"] + 0.02, summary
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt", expected_method="voxelmorph")
    assert best["extra"]["best_value"] == summary["best_value"]
    assert best["extra"]["grid"]["shape"] == [48, 48]  # the network grid travels along


def test_init_starts_from_other_weights(ants2d, data, tmp_path):
    """``init`` fine-tunes: a fresh run starts from a checkpoint's weights, not random ones;
    weights of another architecture are refused with the file named."""
    source, _ = _run(_config(ants2d, tmp_path / "src", steps=3, checkpoint_every=3), data)
    ckpt = tmp_path / "src" / "checkpoints" / "last.pt"

    def first_step(trainer, step, losses):
        if step == 1:
            raise Crash("stop")

    cfg = _config(ants2d, tmp_path / "tuned", steps=3, init=str(ckpt), optimizer={"lr": 1e-12})
    tuned = Trainer(cfg, tiny_vxm(), *data, callback=first_step)
    with pytest.raises(Crash):
        tuned.fit()
    for (k, va), vb in zip(
        source.method.state_dict().items(), tuned.method.state_dict().values(), strict=True
    ):
        assert torch.allclose(va, vb, atol=1e-9), k
    fresh = tiny_vxm().state_dict().values()
    assert not all(
        torch.equal(a, b) for a, b in zip(fresh, source.method.state_dict().values(), strict=True)
    )
    # a network of another shape: clear error naming the file
    wrong = tiny_vxm()
    first = next(iter(wrong.state_dict()))
    state = load_checkpoint(ckpt)
    state["model"][first] = torch.zeros(1, 2, 3)
    torch.save(state, tmp_path / "wrong.pt")
    cfg = _config(ants2d, tmp_path / "w", steps=1, init=str(tmp_path / "wrong.pt"))
    with pytest.raises(InputError, match="wrong.pt: init weights do not fit"):
        Trainer(cfg, wrong, *data).fit()
    cfg = _config(ants2d, tmp_path / "n", steps=1, init="no-such-model")
    with pytest.raises(InputError, match="init no-such-model: no such checkpoint"):
        Trainer(cfg, tiny_vxm(), *data).fit()


class TwoGroups(VoxelMorph):
    """VoxelMorph whose flow head has its own optimizer and loss (a method with two groups,
    as adversarial methods have)."""

    def parameter_groups(self):
        head = {id(p) for p in self.flow.parameters()}
        body = [p for p in self.parameters() if id(p) not in head]
        return {"model": body, "head": list(self.flow.parameters())}

    def loss(self, batch, output):
        terms = super().loss(batch, output)
        terms["total_head"] = 0.0 * terms["total"] + output.displacement.square().mean()
        return terms


def test_several_optimizer_groups(ants2d, data, tmp_path):
    """Each group steps on its own loss with its own learning rate; resume restores both."""
    torch.manual_seed(0)
    method = TwoGroups(**TINY_VXM)
    cfg = _config(
        ants2d,
        tmp_path,
        steps=2,
        checkpoint_every=2,
        optimizer={"lr": 3e-3, "groups": {"head": {"lr": 1e-9}}},
    )
    head_before = [p.detach().clone() for p in method.flow.parameters()]
    body_before = [p.detach().clone() for p in method.unet.parameters()]
    Trainer(cfg, method, *data).fit()
    moved = [
        float((p.detach() - q).abs().max())
        for p, q in zip(method.flow.parameters(), head_before, strict=True)
    ]
    assert max(moved) < 1e-6  # lr 1e-9 for the head group
    assert any(
        not torch.equal(p, q) for p, q in zip(method.unet.parameters(), body_before, strict=True)
    )
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert set(state["optimizer"]) == {"model", "head"}
    bad = _config(ants2d, tmp_path / "x", optimizer={"groups": {"critic": {"lr": 1.0}}})
    with pytest.raises(InputError, match="no parameter group critic"):
        Trainer(bad, TwoGroups(**TINY_VXM), *data).fit()


def test_grid_must_suit_the_network(ants2d, data, tmp_path):
    deep = VoxelMorph(ndim=2, enc_features=[8, 8, 8, 8, 8, 8], dec_features=[8] * 6)
    with pytest.raises(InputError, match="divisible by 64"):
        Trainer(_config(ants2d, tmp_path), deep, *data)
