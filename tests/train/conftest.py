"""Fixtures of tests/train: 2D brain slices with intensity-class labels, one torch thread, a
tiny VoxelMorph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from learnreg.io.images import read_image, write_image
from learnreg.methods.registry import create_method

TINY_VXM = {"ndim": 2, "enc_features": [8, 16], "dec_features": [16, 16, 8], "window": 5}
"""A real method, small enough for CPU tests: a two-level 2D VoxelMorph."""


def tiny_vxm():
    return create_method("voxelmorph", **TINY_VXM)


def make_ants2d(data_root: Path, out: Path) -> Path:
    """ants2d slices as PNG images + PNG label maps (3 smoothed intensity classes)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for f in sorted((data_root / "ants2d").glob("*.jpg")):
        img = read_image(f)
        arr = ndimage.gaussian_filter(img.data[0].numpy(), 2.0)
        lab = np.digitize(arr, [30.0, 110.0, 170.0]).astype(np.uint8)
        write_image(img, out / "images" / f"{f.stem}.png", dtype="uint8")
        write_image(img.with_data(torch.from_numpy(lab)[None]), out / "labels" / f"{f.stem}.png")
    return out


@pytest.fixture(scope="session")
def ants2d(data_root: Path, tmp_path_factory) -> Path:
    return make_ants2d(data_root, tmp_path_factory.mktemp("ants2d"))
