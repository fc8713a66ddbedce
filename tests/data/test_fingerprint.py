"""An atlas model's fixed image is recognized by its fingerprint, and no other brain is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learnreg.core.image import Image
from learnreg.data.fingerprint import atlas_fingerprint, is_atlas
from learnreg.io.images import read_image


@pytest.fixture(scope="module")
def atlas(lpba: Path) -> tuple[Image, dict]:
    image = read_image(lpba / "images/S01.nii.gz")
    return image, atlas_fingerprint(image)


def test_the_atlas_is_recognized_and_other_subjects_are_not(atlas, lpba: Path):
    image, fp = atlas
    assert is_atlas(image, fp)
    rescaled = image.with_data(image.data * 3.0 + 7.0)  # another scanner scaling
    assert is_atlas(rescaled, fp)
    for s in ("S11", "S39", "S40"):  # S39: the closest to S01 at 1/4 (0.975)
        assert not is_atlas(read_image(lpba / f"images/{s}.nii.gz"), fp), s


def test_a_shifted_or_regridded_atlas_is_not_the_atlas(atlas):
    image, fp = atlas
    shifted = image.with_data(torch.roll(image.data, shifts=6, dims=1))
    assert not is_atlas(shifted, fp)
    cropped = Image(image.data[:, 2:, :, :].clone(), image.grid.resized((158, 192, 160)), "c")
    assert not is_atlas(cropped, fp)
