"""Initialization of classical registration: the rotation search (antsAI-like) recovers a
real LPBA40 pair whose header is rotated by 180° about S, where the centre-of-mass start does
not; implausible affines are reported."""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import learnreg
from learnreg.cli.runtime import logging_into
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.io.images import read_image
from learnreg.optimize.initialize import implausible_affine, rotation_angle, rotation_candidates


def test_candidates_are_rotations_and_hold_every_quarter_turn():
    two = rotation_candidates(2)
    assert two.shape == (24, 2, 2) and torch.allclose(two[0], torch.eye(2, dtype=two.dtype))
    three = rotation_candidates(3)
    assert torch.allclose(three[0], torch.eye(3, dtype=three.dtype))
    eye = torch.eye(3, dtype=three.dtype).expand_as(three)
    assert torch.allclose(three @ three.transpose(1, 2), eye, atol=1e-9)
    assert torch.allclose(torch.linalg.det(three), torch.ones(len(three), dtype=three.dtype))
    keys = {tuple(np.round(r.numpy(), 6).ravel()) for r in three}
    assert len(keys) == len(three)  # no duplicates
    # the 24 proper rotations of the cube (signed permutations, det +1) are all candidates
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((-1.0, 1.0), repeat=3):
            r = np.zeros((3, 3))
            r[range(3), perm] = signs
            if np.linalg.det(r) > 0:
                assert tuple(np.round(r, 6).ravel()) in keys, r


@pytest.mark.parametrize("degrees", [0.0, 10.0, 90.0, 179.0])
def test_rotation_angle_of_known_rotations(degrees):
    t = math.radians(degrees)
    r = torch.tensor([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    assert rotation_angle(r * 1.3) == pytest.approx(t, abs=1e-6)  # scale does not matter


def test_implausible_affines_are_reported():
    eye = torch.eye(4)
    assert implausible_affine(eye) == []
    shrink = torch.diag(torch.tensor([0.6, 0.6, 0.6, 1.0]))
    assert "volume change of 0.22" in implausible_affine(shrink)[0]
    flip = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    assert "reflection" in implausible_affine(flip)[0]
    half = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0]))  # 180° about S
    (why,) = implausible_affine(half)
    assert "rotates by 180°" in why and "--init search" in why
    assert "--init search" not in implausible_affine(half, hint=False)[0]


def test_warnings_print_as_one_line(capsys):
    with logging_into(None, 0):
        logging.getLogger("learnreg.optimize.classical").warning("the affine rotates")
        logging.getLogger("learnreg.x").info("not shown")
    assert capsys.readouterr().err == "warning: the affine rotates\n"


def test_search_recovers_a_header_rotated_180_degrees_about_s(lpba: Path):
    fixed = read_image(lpba / "images" / "S01.nii.gz")
    moving = read_image(lpba / "images" / "S11.nii.gz")
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # world x, y negated: 180° about S
    rotated = Image(moving.data, Grid.from_affine(moving.grid.shape, flip @ moving.grid.affine))
    truth = learnreg.register(fixed, moving, preset="affine").result.linear()
    pts = fixed.grid.world_points().reshape(-1, 3)[fixed.data[0].reshape(-1) > fixed.data.mean()]
    pts = pts[::50].unsqueeze(0)
    expected = truth(pts)[0] * torch.tensor([-1.0, -1.0, 1.0])

    def error(reg) -> float:
        return float((reg.result.linear()(pts)[0] - expected).norm(dim=1).mean())

    default = learnreg.register(fixed, rotated, preset="affine")
    searched = learnreg.register(fixed, rotated, preset="affine", init="search")
    assert error(default) > 20.0  # the centre-of-mass start stays in the wrong orientation
    assert error(searched) < 1.0
    assert searched.info["initialization"]["best_rotation_degrees"] == pytest.approx(180.0)
    assert any("rotates by 17" in w or "rotates by 18" in w for w in searched.info["warnings"])
