"""Preprocessing onto a network grid and mapping predictions back to physical space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.core import Grid, Image
from learnreg.data.preprocess import (
    NetworkGrid,
    Preprocessor,
    normalize_intensity,
    sample_labels_index,
    to_physical,
)
from learnreg.io.images import read_image, read_labels
from learnreg.spatial.sampling import resample, sample


@pytest.fixture(scope="module")
def s11(lpba):
    return read_image(lpba / "images" / "S11.nii.gz"), read_labels(lpba / "labels" / "S11.nii.gz")


def test_network_grid_reorients_and_pads(s11):
    img, _ = s11
    net = NetworkGrid(shape=(40, 48, 40), orientation="RAS", levels=3).grid_for(img.grid)
    assert net.shape == (40, 48, 40)
    np.testing.assert_allclose(net.direction, np.eye(3))  # LPBA40 is stored (L, P, S)
    np.testing.assert_allclose(net.spacing, (4.0, 4.0, 4.0))
    # same field of view: the centre of both grids is the same world point
    c_in = img.grid.index_to_world(torch.tensor([(s - 1) / 2 for s in img.grid.shape]).double())
    c_net = net.index_to_world(torch.tensor([(s - 1) / 2 for s in net.shape]).double())
    torch.testing.assert_close(c_in, c_net)
    padded = NetworkGrid(spacing=(5.0, 5.0, 5.0), levels=4).grid_for(img.grid)
    assert all(s % 16 == 0 for s in padded.shape) and padded.shape == (32, 48, 32)
    native = NetworkGrid(shape=(40, 48, 40), orientation="native").grid_for(img.grid)
    np.testing.assert_allclose(native.direction, img.grid.direction)


def test_network_image_placed_in_physical_space(s11):
    img, lab = s11
    pre = Preprocessor(NetworkGrid(shape=(40, 48, 40), levels=3), antialias=False)
    grid = pre.grid_for(img)
    net = pre.image(img, grid)
    assert net.grid is grid and net.data.shape == (1, 40, 48, 40)
    assert 0.0 <= float(net.data.min()) and float(net.data.max()) <= 1.0
    # the recorded grid places the tensor: resampling the (normalized) original onto it agrees
    ref = resample(img.with_data(normalize_intensity(img.data)), grid)
    torch.testing.assert_close(net.data, ref.data)
    # a world point holds the same anatomy before and after (label at the point)
    nl = pre.labels(lab, grid)
    assert nl.data.dtype == torch.int64
    assert set(nl.data.unique().tolist()) <= set(lab.data.unique().tolist())
    rng = np.random.default_rng(0)
    idx = torch.from_numpy(rng.integers(2, 38, (200, 3))).double()
    world = grid.index_to_world(idx)
    orig_idx = img.grid.world_to_index(world)  # voxel centres fall between original voxels
    after = nl.data[0][tuple(idx.long().T)]
    near = torch.stack(
        [
            lab.data[0][
                tuple(
                    torch.where(torch.tensor(c).bool(), orig_idx.ceil(), orig_idx.floor()).long().T
                )
            ]
            for c in np.ndindex(2, 2, 2)
        ]
    ).long()  # labels of the 8 original voxels around each point
    assert bool((near == after).any(0).all())
    assert float((near == after).float().mean(0).mean()) > 0.8
    # intensities too (anti-aliasing off, linear vs linear)
    coords = img.grid.world_to_grid_sample(world[None, :, None, None, :])
    b = sample(img.batch(), coords.float())[0, 0].flatten()
    a = net.data[0][tuple(idx.long().T)]
    bn = (b - b.min()) / (b.max() - b.min())
    assert torch.corrcoef(torch.stack([a, bn]))[0, 1] > 0.999


def test_to_physical_maps_network_displacement_to_world(s11):
    img, _ = s11
    small = Image(img.data[:, ::4, ::4, ::4].contiguous(), img.grid.resized((40, 48, 40)))
    pre = Preprocessor(NetworkGrid(shape=(20, 24, 20), levels=2))
    grid = pre.grid_for(small)
    u = torch.zeros(1, 3, *grid.shape)
    u[:, 0] = 1.5  # 1.5 network voxels along network axis 0 (= +R)
    field = to_physical(u, grid)
    p = grid.world_points(torch.float32)[10, 12, 10].reshape(1, 3)
    torch.testing.assert_close(field(p) - p, torch.tensor([[1.5 * grid.spacing[0], 0, 0]]))
    # world mm on the original fixed grid (stored L, P, S): composes through resample
    mm = field.displacement(small.grid)
    torch.testing.assert_close(mm[0, :, 20, 24, 20], torch.tensor([1.5 * grid.spacing[0], 0, 0]))
    # half a network voxel = one voxel of the original grid, along +R = -index axis 0 there
    half = to_physical(u / 3, grid)
    assert abs(grid.spacing[0] / 2 - small.grid.spacing[0]) < 1e-6
    warped = resample(small, small.grid, half)  # warped(x) = image(x + u): applies to originals
    torch.testing.assert_close(warped.data[:, 5:-5, 5:-5, 5:-5], small.data[:, 4:-6, 5:-5, 5:-5])
    with pytest.raises(ValueError, match="network grid"):
        to_physical(torch.zeros(1, 3, 4, 4, 4), grid)


def test_label_sampler_matches_one_hot_sampler():
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 5, (1, 1, 9, 11), generator=g)
    pts = torch.rand(1, 7, 6, 2, generator=g) * torch.tensor([10.0, 12.0]) - 1
    fast = sample_labels_index(lab, pts)
    ref = sample(lab, Grid((9, 11)).index_to_grid_sample(pts), mode="label")
    assert (fast == ref).float().mean() > 0.95  # ties may break differently


def test_2d_and_validation():
    img = Image(torch.rand(1, 30, 20), Grid((30, 20), (2.0, 3.0)))
    pre = Preprocessor(NetworkGrid(levels=2))
    out = pre.image(img)
    assert out.grid.shape == (32, 20) and out.grid.spacing == (2.0, 3.0)
    with pytest.raises(ValueError, match="orientation"):
        NetworkGrid(orientation="LPS")
    with pytest.raises(ValueError, match="does not match"):
        NetworkGrid(shape=(8, 8, 8)).grid_for(img.grid)
