"""Initial momenta of classical LDDMM (Quicksilver's supervision) on real LPBA40 slices."""

from __future__ import annotations

import pytest
import torch

import learnreg.data.lddmm_momenta as lm
from learnreg.core.errors import InputError
from learnreg.data.lddmm_momenta import MomentumPairs, momentum_registration_config
from learnreg.data.sources import synthetic_datasets
from learnreg.spatial.lddmm import GeodesicShooting

from .._lpba_slices import axial_slices, on_network_grid

FAST = momentum_registration_config(iterations=(20, 10))


@pytest.fixture(scope="module")
def slices(lpba):
    images, labels = axial_slices(lpba, ["S01", "S11"])
    on_grid, grid, pre = on_network_grid(images)
    return on_grid, labels, grid, pre


def test_momenta_are_on_the_image_grid_align_the_pair_and_are_cached(slices, tmp_path, monkeypatch):
    images, labels, grid, pre = slices
    pairs = MomentumPairs(images, labels, "S01", ["S11"], grid, pre, tmp_path, FAST)
    item = pairs[0]
    m = item["target"]
    assert m.shape == (2, *grid.shape) and float(m.abs().max()) > 0.1
    info = pairs.references["S11"]
    assert info["dice_after"] > info["dice_before"] + 0.02, info
    assert info["min_det_j"] > 0
    # the stored momentum is the registration's: its geodesic (the config's kernel) moves
    d = FAST.deformable
    shot = GeodesicShooting(grid, m[None], **d.kernel, steps=d.steps, physical=True)
    assert float(shot.backward_displacement().norm(dim=1).max()) > 0.5

    def fail(*a, **k):
        raise AssertionError("recomputed a cached momentum")

    monkeypatch.setattr(lm, "lddmm_momentum", fail)
    again = MomentumPairs(images, labels, "S01", ["S11"], grid, pre, tmp_path, FAST)
    assert torch.equal(again[0]["target"], m)


def test_bad_configs_are_refused(slices):
    _, _, _, pre = slices
    with pytest.raises(ValueError, match="shrink must end at 1"):
        momentum_registration_config(shrink=(2,))
    with pytest.raises(InputError, match="unknown config key"):
        synthetic_datasets({"kind": "lddmm-momenta", "alphas": 1.0}, pre)
