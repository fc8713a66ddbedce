"""Reference velocities from registering label maps (SVF-Net's supervision) on real LPBA40
slices."""

from __future__ import annotations

import logging

import pytest
import torch

import learnreg.data.reference_fields as rf
from learnreg.core.errors import InputError
from learnreg.data.reference_fields import (
    ReferenceSVFPairs,
    label_registration_config,
    label_svf,
    one_hot_on_grid,
)
from learnreg.data.sources import synthetic_datasets
from learnreg.spatial.sampling import resample
from learnreg.spatial.svf import integrate_velocity

from .._lpba_slices import axial_slices, on_network_grid

FAST = label_registration_config(iterations=40)


@pytest.fixture(scope="module")
def slices(lpba):
    images, labels = axial_slices(lpba, ["S01", "S11", "S12"])
    on_grid, grid, pre = on_network_grid(images)
    return on_grid, labels, grid, pre


def test_one_hot_channels_are_the_resampled_indicators(slices) -> None:
    _, labels, grid, _ = slices
    lab = labels["S01"]
    values = sorted(int(v) for v in torch.unique(lab.data))
    same = one_hot_on_grid(lab, lab.grid, values).data  # on its own grid: exact
    for i, v in enumerate(values):
        assert torch.equal(same[i], (lab.data[0] == v).float())
    coarse = one_hot_on_grid(lab, grid, values).data
    assert coarse.shape == (len(values), *grid.shape)
    torch.testing.assert_close(coarse.sum(0), torch.ones(grid.shape), atol=1e-5, rtol=0)
    one = resample(lab.with_data((lab.data == values[5]).float()), grid).data[0]
    torch.testing.assert_close(coarse[5], one)


def test_label_svf_aligns_the_label_maps(slices) -> None:
    """The reference velocity's exponential (on the network grid) improves the label overlap
    a lot and does not fold."""
    _, labels, grid, _ = slices
    velocity, info = label_svf(labels["S01"], labels["S11"], grid, FAST)
    assert velocity.shape == (2, *grid.shape)
    assert info["dice_after"] > info["dice_before"] + 0.1, info
    assert info["min_det_j"] > 0
    # the stored velocity is the optimized one: integrating it moves voxels by > 1
    u = integrate_velocity(velocity[None], 7)
    assert float(u.norm(dim=1).max()) > 1.0


def test_references_are_cached_and_recomputed_when_stale(slices, tmp_path, monkeypatch, caplog):
    images, labels, grid, pre = slices
    first = ReferenceSVFPairs(images, labels, "S01", ["S11"], grid, pre, tmp_path, FAST)
    item = first[0]
    assert item["target"].shape == (2, *grid.shape) and item["names"] == ("S01", "S11")
    assert item["fixed_labels"].dtype == torch.int64 and item["moving"].shape == (1, *grid.shape)

    def fail(*a, **k):
        raise AssertionError("recomputed a cached reference")

    monkeypatch.setattr(rf, "label_svf", fail)
    again = ReferenceSVFPairs(images, labels, "S01", ["S11"], grid, pre, tmp_path, FAST)
    assert torch.equal(again[0]["target"], item["target"])
    monkeypatch.undo()
    # another configuration is another reference; a corrupted file is recomputed
    other = label_registration_config(iterations=5)
    changed = ReferenceSVFPairs(images, labels, "S01", ["S11"], grid, pre, tmp_path, other)
    assert not torch.equal(changed[0]["target"], item["target"])
    (tmp_path / "S01_S11.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING):
        fixed = ReferenceSVFPairs(images, labels, "S01", ["S11"], grid, pre, tmp_path, other)
    assert "unreadable" in caplog.text
    torch.testing.assert_close(fixed[0]["target"], changed[0]["target"])
    plain = ReferenceSVFPairs(
        images, labels, "S01", ["S12"], grid, pre, tmp_path, FAST, with_references=False
    )
    assert "target" not in plain[0] and not (tmp_path / "S01_S12.pt").exists()


def test_bad_inputs(slices, tmp_path) -> None:
    images, labels, grid, pre = slices
    with pytest.raises(ValueError, match="S99"):
        ReferenceSVFPairs(images, labels, "S01", ["S99"], grid, pre, tmp_path)
    with pytest.raises(ValueError, match="no subjects"):
        ReferenceSVFPairs(images, labels, "S01", [], grid, pre, tmp_path)
    with pytest.raises(InputError, match="data.shape"):
        from learnreg.data.preprocess import NetworkGrid, Preprocessor

        synthetic_datasets({"kind": "svf-references"}, Preprocessor(NetworkGrid(None)))
    with pytest.raises(InputError, match="unknown config key"):
        synthetic_datasets({"kind": "svf-references", "atlass": "S01"}, pre)
