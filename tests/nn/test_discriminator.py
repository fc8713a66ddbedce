"""Discriminator: logits per input or per receptive field, 2D and 3D, clear input errors."""

from __future__ import annotations

import pytest
import torch

from learnreg.nn.discriminator import Discriminator


@pytest.mark.parametrize("ndim", [2, 3])
def test_global_and_patch_outputs(ndim: int) -> None:
    shape = (20,) * ndim
    d = Discriminator(ndim, 2, (4, 8, 8))
    assert d(torch.rand(3, 2, *shape)).shape == (3,)
    p = Discriminator(ndim, 2, (4, 8, 8), output="patch", norm="instance")
    assert p(torch.rand(3, 2, *shape)).shape == (3, 1, *(3,) * ndim)  # 20 → 10 → 5 → 3


def test_patch_logits_see_a_bounded_neighbourhood() -> None:
    """Four blocks of kernel 3 and stride 2, then a 3-conv: a receptive field of 63."""
    d = Discriminator(2, 1, output="patch")
    x = torch.zeros(1, 1, 129, 129, requires_grad=True)
    y = d(x)
    y[0, 0, 4, 4].backward()
    seen = (x.grad[0, 0].abs() > 0).nonzero()
    assert (seen.max(0).values - seen.min(0).values + 1).tolist() == [63, 63]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"expected \(N, 2, \*S\) with 2 spatial dims"):
        Discriminator(2, 2)(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="output"):
        Discriminator(2, 2, output="pixel")
