"""Supervised transformation-error losses."""

from __future__ import annotations

import math

import pytest
import torch

from learnreg.core import Grid
from learnreg.losses import functional as LF
from learnreg.spatial import AffineTransform


def test_parameter_mse():
    pred = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert LF.parameter_mse(pred, target, reduction="none").tolist() == pytest.approx([13 / 3, 1.0])
    assert LF.parameter_mse(pred, target).item() == pytest.approx((13 / 3 + 1) / 2)
    # any parameter layout (N, ...), e.g. affine matrices
    m = torch.eye(4).repeat(2, 1, 1)
    assert LF.parameter_mse(m + 0.5, m, reduction="sum").item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        LF.parameter_mse(pred, target[:, :2])


def test_grid_point_distance_between_transformed_grids():
    """Points of a 3D grid mapped by two affine transforms differing by a translation (3, 4, 12)
    in batch item 0 and by a 90° rotation about the origin in item 1."""
    grid = Grid((5, 4, 3), spacing=(2.0, 1.0, 1.5), origin=(-4.0, -1.5, -1.5))
    pts = grid.world_points().reshape(1, -1, 3).expand(2, -1, -1)
    true = AffineTransform.identity(3, batch=2)
    shift = torch.eye(4)
    shift[:3, 3] = torch.tensor([3.0, 4.0, 12.0])
    rot = torch.eye(4)
    rot[:2, :2] = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    pred = AffineTransform(torch.stack([shift, rot]))
    d = LF.grid_point_distance(pred(pts), true(pts), reduction="none")
    assert d[0].item() == pytest.approx(13.0, rel=1e-6)
    # rotation by 90° moves a point by sqrt(2) times its distance to the rotation axis
    radius = pts[1, :, :2].norm(dim=-1)
    assert d[1].item() == pytest.approx((math.sqrt(2) * radius).mean().item(), rel=1e-5)


def test_grid_point_distance_has_zero_gradient_at_zero_error():
    p = torch.rand(2, 10, 3, requires_grad=True)
    value = LF.grid_point_distance(p, p.detach().clone())
    value.backward()
    assert value.item() == 0 and torch.isfinite(p.grad).all() and p.grad.abs().max() == 0
    with pytest.raises(ValueError, match=r"\(N, P, D\)"):
        LF.grid_point_distance(torch.zeros(10, 3), torch.zeros(10, 3))


@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 3)])
def test_field_errors_of_a_constant_difference(shape):
    d = len(shape)
    diff = torch.tensor([3.0, 4.0, 12.0][:d]).view(1, d, *([1] * d))
    target = torch.randn(2, d, *shape)
    pred = target + diff
    norm = math.sqrt(sum(v * v for v in [3.0, 4.0, 12.0][:d]))
    assert LF.field_l2(pred, target).item() == pytest.approx(norm, rel=1e-5)
    assert LF.field_l2(pred, target, squared=True).item() == pytest.approx(norm**2, rel=1e-5)
    assert LF.field_l1(pred, target).item() == pytest.approx(
        sum([3.0, 4.0, 12.0][:d]) / d, rel=1e-5
    )
    spacing = [2.0, 0.5, 1.0][:d]
    mm = [v * s for v, s in zip([3.0, 4.0, 12.0][:d], spacing, strict=True)]
    assert LF.field_l2(pred, target, spacing).item() == pytest.approx(
        math.sqrt(sum(v * v for v in mm)), rel=1e-5
    )
    assert LF.field_l1(pred, target, spacing).item() == pytest.approx(sum(mm) / d, rel=1e-5)


def test_field_errors_reduction_gradients_and_shapes():
    target = torch.randn(3, 2, 5, 4)
    pred = target.clone().requires_grad_()
    assert LF.field_l2(pred, target).item() == 0
    LF.field_l2(pred, target).backward()
    assert torch.isfinite(pred.grad).all()
    pred = target + torch.randn(3, 2, 5, 4)
    for fn in (LF.field_l1, LF.field_l2):
        per_item = fn(pred, target, reduction="none")
        assert per_item.shape == (3,)
        assert fn(pred, target, reduction="sum").item() == pytest.approx(
            per_item.sum().item(), rel=1e-6
        )
        with pytest.raises(ValueError, match="reduction"):
            fn(pred, target, reduction="batchmean")
        with pytest.raises(ValueError, match=r"\(N, D, \*S\)"):
            fn(pred[:, :1], target[:, :1])
        with pytest.raises(ValueError, match="spacing"):
            fn(pred, target, spacing=(1.0, 1.0, 1.0))
