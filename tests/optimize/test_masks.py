"""Masks restrict the metric's support (ANTs -x): on a real LPBA40 slice pair, a bright
corruption outside the brain pulls the unmasked registration off (Dice falls) and leaves the
masked one as it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import learnreg
from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.io.images import read_image, read_labels
from learnreg.metrics import score_result
from learnreg.optimize.initialize import com_init


def _axial(path: Path, labels: bool = False, z: int = 80) -> Image:
    image = read_labels(path) if labels else read_image(path)
    a = image.grid.affine
    plane = np.eye(3)
    plane[:2, :2], plane[:2, 2] = a[:2, :2], a[:2, 3]
    data = image.data[0, :, :, z]
    return Image(data[None].clone(), Grid.from_affine(data.shape, plane), str(path))


@pytest.fixture(scope="module")
def pair(lpba: Path) -> dict:
    f, m = _axial(lpba / "images/S01.nii.gz"), _axial(lpba / "images/S11.nii.gz")
    fl, ml = _axial(lpba / "labels/S01.nii.gz", True), _axial(lpba / "labels/S11.nii.gz", True)
    brain_f = ndimage.binary_dilation(fl.data[0].numpy() > 0, iterations=3)
    brain_m = ndimage.binary_dilation(ml.data[0].numpy() > 0, iterations=3)
    # a bright disc just beyond the moving brain's anterior edge, outside its mask
    yy, xx = np.mgrid[: brain_m.shape[0], : brain_m.shape[1]]
    inside = np.argwhere(brain_m)
    disc = ((yy - (inside[:, 0].max() + 10)) ** 2 + (xx - inside[:, 1].mean()) ** 2) < 30**2
    disc &= ~brain_m
    bad = m.data.clone()
    bad[0][torch.from_numpy(disc)] = float(m.data.max())
    masks = {
        "fixed_mask": Image(torch.from_numpy(brain_f.astype(np.uint8))[None], f.grid, "fm"),
        "moving_mask": Image(torch.from_numpy(brain_m.astype(np.uint8))[None], m.grid, "mm"),
    }
    return {
        "f": f,
        "m": m,
        "bad": Image(bad, m.grid, "corrupted"),
        "fl": fl,
        "ml": ml,
        "masks": masks,
    }


def _dice(pair: dict, moving: Image, masks: dict, shift: float = 0.0) -> float:
    """Dice after registering from the centres of mass moved by ``shift`` mm."""
    start = com_init(pair["f"], moving).double()
    start[0, -1] += shift
    reg = learnreg.register(pair["f"], moving, initial=start.numpy(), **masks)
    return score_result(
        reg.result, fixed_labels=pair["fl"], moving_labels=pair["ml"], metrics=("dice",)
    )["dice_mean"]


# Registrations of this pair are chaotic: a start moved by 1e-6 mm changes the corrupted
# image's Dice by 0.05 (unmasked) and either's by 0.01 (masked), so each case is the mean
# over three starts.
SHIFTS = (0.0, 0.3, 0.6)


def test_corruption_outside_the_mask_changes_nothing(pair: dict):
    clean = np.mean([_dice(pair, pair["m"], {}, s) for s in SHIFTS])
    bad = np.mean([_dice(pair, pair["bad"], {}, s) for s in SHIFTS])
    assert bad < clean - 0.015  # measured 0.399 vs 0.439: the disc pulls the unmasked metric
    clean_m = np.mean([_dice(pair, pair["m"], pair["masks"], s) for s in SHIFTS])
    bad_m = np.mean([_dice(pair, pair["bad"], pair["masks"], s) for s in SHIFTS])
    assert abs(bad_m - clean_m) < 0.02  # measured 0.442 vs 0.430 (spread between starts 0.01)
    assert bad_m > bad + 0.02


def test_bad_masks_are_refused(pair: dict):
    empty = Image(torch.zeros(1, *pair["f"].grid.shape, dtype=torch.uint8), pair["f"].grid, "empty")
    with pytest.raises(InputError, match="empty: the fixed mask is empty"):
        learnreg.register(pair["f"], pair["m"], fixed_mask=empty)
    with pytest.raises(InputError, match="label map has non-integer values"):
        learnreg.register(pair["f"], pair["m"], moving_mask=pair["m"])
