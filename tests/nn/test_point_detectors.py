"""The per-landmark detector bank."""

from __future__ import annotations

import pytest
import torch

from learnreg.nn.point_detectors import DetectorBank


def test_detectors_are_independent() -> None:
    torch.manual_seed(0)
    bank = DetectorBank(3, 8, (60, 60))
    x = torch.rand(3, 5, 8)
    before = bank(x)
    assert before.shape == (3, 5)
    with torch.no_grad():
        bank.weights[0][1].add_(1.0)  # change detector 1 only
    after = bank(x)
    assert torch.equal(after[[0, 2]], before[[0, 2]]) and not torch.equal(after[1], before[1])
    with pytest.raises(ValueError, match=r"\(3, M, 8\)"):
        bank(torch.rand(2, 5, 8))
