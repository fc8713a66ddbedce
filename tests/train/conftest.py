"""Fixtures of tests/train: 2D brain slices with intensity-class labels, one torch thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from learnreg.io.images import read_image, write_image


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
