"""score_result: the one function that scores a registration result, and its three users
(``learnreg register``'s metrics.json, the evaluation runner, training validation)."""

from __future__ import annotations

import json

import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.metrics import dice_per_label, hd95, jacobian_stats, score_result
from learnreg.metrics.score import METRICS, SCORE_KEYS
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.result import RegistrationResult

GRID = Grid((20, 24), (1.5, 2.0), (3.0, -4.0))


def _labels(shift: int = 0) -> Image:
    lab = torch.zeros(1, *GRID.shape, dtype=torch.int64)
    lab[0, 3:9, 4:12] = 1
    lab[0, 10:17, 6:20] = 2
    lab[0, 5:8, 15:22] = 3
    return Image(torch.roll(lab, shift, dims=1), GRID, "labels")


def _translation(t) -> AffineTransform:
    m = torch.eye(3)
    m[:2, 2] = torch.as_tensor(t, dtype=torch.float32)
    return AffineTransform(m[None])


def test_identity_scores_are_the_metrics_of_the_unwarped_maps():
    fixed, moving = _labels(), _labels(shift=2)
    s = score_result(RegistrationResult(GRID, GRID), fixed_labels=fixed, moving_labels=moving)
    assert list(s) == [k for m in METRICS for k in SCORE_KEYS[m]]
    dice = dice_per_label(fixed.data[0], moving.data[0])
    assert s["dice"] == {str(k): v for k, v in dice.items()}
    assert s["dice_mean"] == pytest.approx(sum(dice.values()) / 3)
    hd = hd95(fixed.data[0], moving.data[0], GRID.spacing)
    assert s["hd95"] == {str(k): v for k, v in hd.items()} and s["hd95_mean"] > 0
    # affine only: no folds, no Jacobian statistics, no inverse consistency, no landmarks
    assert (s["folding_fraction"], s["folding_count"], s["sdlogj"]) == (0.0, 0, 0.0)
    assert s["jacobian"] is None and s["ice_mean"] is None and s["tre_mean"] is None
    assert s["seconds"] is None
    json.dumps(s)  # records and metrics.json are JSON


def test_metrics_are_selectable_and_checked():
    s = score_result(
        RegistrationResult(GRID, GRID), fixed_labels=_labels(), moving_labels=_labels(1),
        metrics=("dice",),
    )  # fmt: skip
    assert set(s) == {"dice", "dice_mean"}
    assert set(score_result(RegistrationResult(GRID, GRID), metrics=("hd95",))) == {
        "hd95",
        "hd95_mean",
    }
    with pytest.raises(ValueError, match="did you mean 'dice'"):
        score_result(RegistrationResult(GRID, GRID), metrics=("dise",))
    with pytest.raises(ValueError, match="without moving_labels"):
        score_result(RegistrationResult(GRID, GRID), fixed_labels=_labels())


def test_a_registration_that_undoes_the_shift_scores_perfectly():
    # moving = fixed shifted by 2 voxels along i: x_moving = x_fixed + 2 * spacing_i (world)
    fixed, moving = _labels(), _labels(shift=2)
    result = RegistrationResult(GRID, GRID, _translation([2 * GRID.spacing[0], 0.0]))
    s = score_result(result, fixed_labels=fixed, moving_labels=moving, metrics=("dice", "hd95"))
    assert s["dice_mean"] == pytest.approx(1.0) and s["hd95_mean"] == pytest.approx(0.0)
    # tensors on the result's grids work as well as images
    t = score_result(result, fixed_labels=fixed.data[0], moving_labels=moving.data,
                     metrics=("dice",))  # fmt: skip
    assert t["dice_mean"] == pytest.approx(1.0)


def test_tre_maps_fixed_landmarks_through_the_result():
    pf = torch.tensor([[1.0, 2.0], [10.0, -3.0], [4.0, 7.0]], dtype=torch.float64)
    shift = torch.tensor([3.0, -4.0], dtype=torch.float64)
    pm = pf + shift
    before = score_result(RegistrationResult(GRID, GRID), fixed_points=pf, moving_points=pm)
    assert before["tre_mean"] == pytest.approx(5.0) and before["tre_max"] == pytest.approx(5.0)
    after = score_result(
        RegistrationResult(GRID, GRID, _translation(shift)), fixed_points=pf, moving_points=pm
    )
    assert after["tre_mean"] == pytest.approx(0.0, abs=1e-5)


def test_deformable_part_jacobian_and_inverse_consistency():
    u = torch.zeros(1, 2, *GRID.shape)
    u[:, 0, 6:14, 6:18] = 0.5  # a bump: folds at neither edge (|du| < 1)
    w = -u  # its inverse, up to the bump's edges
    result = RegistrationResult(
        GRID, GRID, deformable=DisplacementField(GRID, u),
        inverse_deformable=DisplacementField(GRID, w), info={"seconds": 1.5},
    )  # fmt: skip
    s = score_result(result, metrics=("jacobian", "ice", "seconds"))
    assert s["jacobian"] == jacobian_stats(u)
    assert s["folding_count"] == 0 and s["sdlogj"] == s["jacobian"]["sdlogj"] > 0
    assert 0 < s["ice_mean"] < 0.1 and s["seconds"] == 1.5
    no_inverse = RegistrationResult(GRID, GRID, deformable=DisplacementField(GRID, u))
    assert score_result(no_inverse, metrics=("ice",))["ice_mean"] is None


# ---------------------------------------------------------------------------- its users
def test_training_validation_scores_dice_with_score_result():
    """RegistrationMethod.validate: the prediction as a RegistrationResult on the network
    grid, Dice by score_result (and the identity Dice of the unregistered pair)."""
    from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod

    class Fixed(RegistrationMethod):
        def forward(self, fixed, moving, grid=None):  # pragma: no cover - not called
            raise NotImplementedError

    fixed, moving = _labels(), _labels(shift=2)
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.interpolate(
        torch.randn(2, 2, 4, 4, generator=g), GRID.shape, mode="bilinear", align_corners=True
    )
    out = MethodOutput(DisplacementField(GRID, u), GRID)
    labels = (fixed.data[None].repeat(2, 1, 1, 1), moving.data[None].repeat(2, 1, 1, 1))
    batch = RegistrationBatch(torch.zeros(2, 1, *GRID.shape), torch.zeros(2, 1, *GRID.shape),
                              *labels, grid=GRID)  # fmt: skip
    measures = Fixed().validate(batch, out)
    expect = [
        score_result(
            RegistrationResult(GRID, GRID, deformable=DisplacementField(GRID, u[i : i + 1])),
            fixed_labels=fixed, moving_labels=moving, metrics=("dice",),
        )["dice_mean"]
        for i in range(2)
    ]  # fmt: skip
    identity = score_result(RegistrationResult(GRID, GRID), fixed_labels=fixed,
                            moving_labels=moving, metrics=("dice",))["dice_mean"]  # fmt: skip
    assert measures["dice"] == pytest.approx(sum(expect) / 2, abs=1e-12)
    assert measures["identity_dice"] == pytest.approx(identity, abs=1e-12)


def test_register_metrics_json_scores_with_score_result(tmp_path):
    """``learnreg register``'s metrics.json: Dice after the affine part and after all, and
    the Jacobian statistics, are score_result's."""
    from learnreg.api.outputs import write_outputs

    yy, xx = torch.meshgrid(torch.arange(20.0), torch.arange(24.0), indexing="ij")
    img = Image((torch.sin(yy / 3) * torch.cos(xx / 4) + 2)[None], GRID, "img")
    fixed_labels, moving_labels = _labels(), _labels(shift=2)
    u = torch.zeros(1, 2, *GRID.shape)
    u[:, 1, 4:16, 4:20] = 0.4
    result = RegistrationResult(
        GRID, GRID, _translation([0.0, 1.0]), DisplacementField(GRID, u), info={"seconds": 2.0}
    )
    metrics = write_outputs(result, img, img, tmp_path, fixed_labels, moving_labels)
    s = score_result(result, fixed_labels=fixed_labels, moving_labels=moving_labels)
    affine = score_result(
        RegistrationResult(GRID, GRID, result.affine),
        fixed_labels=fixed_labels, moving_labels=moving_labels,
    )  # fmt: skip
    assert metrics["dice"] == s["dice_mean"] and metrics["dice_affine"] == affine["dice_mean"]
    assert metrics["jacobian"] == s["jacobian"] and metrics["seconds"] == 2.0
    assert json.loads((tmp_path / "metrics.json").read_text())["dice"] == pytest.approx(
        metrics["dice"]
    )
