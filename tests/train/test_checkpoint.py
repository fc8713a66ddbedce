"""Checkpoints: atomic, weights_only-loadable, clear errors for foreign or corrupt files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from learnreg.core.errors import InputError
from learnreg.train import checkpoint as ck
from learnreg.train.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint

from .conftest import tiny_vxm


def _save(path, method="voxelmorph", **kw):
    torch.manual_seed(0)
    model = tiny_vxm()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)).warped.sum().backward()
    opt.step()
    return (
        save_checkpoint(
            path, model=model, method=method, step=3, config={"a": [1, 2]}, optimizer=opt, **kw
        ),
        model,
        opt,
    )


def test_round_trip_weights_only(tmp_path):
    path, model, opt = _save(tmp_path / "c.pt", extra={"best_dice": 0.5})
    raw = torch.load(path, weights_only=True)  # plain types and tensors only
    assert raw["method"] == "voxelmorph" and raw["step"] == 3 and raw["config"] == {"a": [1, 2]}
    state = load_checkpoint(path, expected_method="voxelmorph")
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    assert state["optimizer"]["state"][0]["exp_avg"].shape == next(model.parameters()).shape
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left


def test_rng_states_restore():
    state = ck.capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_other_method_version_and_corrupt(tmp_path, monkeypatch):
    path, *_ = _save(tmp_path / "c.pt")
    with pytest.raises(
        InputError, match=r"c\.pt: checkpoint of method 'voxelmorph', expected 'vxm'"
    ):
        load_checkpoint(path, expected_method="vxm")
    old, *_ = _save(tmp_path / "old.pt")
    monkeypatch.setattr(ck, "__version__", "7.0.0")
    with pytest.raises(InputError, match=r"old\.pt: written by learnreg .* incompatible"):
        load_checkpoint(old)
    monkeypatch.undo()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError, match=r"bad\.pt: corrupt checkpoint"):
        load_checkpoint(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match=r"junk\.pt"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(InputError, match="not a learnreg training checkpoint"):
        load_checkpoint(other)
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="not a tensor or plain type"):
        save_checkpoint(tmp_path / "x.pt", model={}, method="m", step=0, config={"p": object()})
    assert not (tmp_path / "x.pt").exists()
