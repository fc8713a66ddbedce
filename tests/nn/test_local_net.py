"""LocalNet (label-reg's local network): shapes, identity start, the sum of its summands."""

from __future__ import annotations

import pytest
import torch

from learnreg.nn.local_net import LocalNet


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_start_and_summed_multiscale_fields(ndim: int) -> None:
    torch.manual_seed(0)
    net = LocalNet(ndim, 2, (4, 8, 8))
    x = torch.rand(2, 2, *(16,) * ndim)
    u = net(x)
    assert u.shape == (2, ndim, *(16,) * ndim) and float(u.detach().abs().max()) == 0.0
    assert sorted(net.summands) == [0, 1, 2, 3]
    for head in net.heads.values():
        torch.nn.init.normal_(head.weight, 0, 0.01)
    u = net(x)
    torch.testing.assert_close(u, sum(net.summands.values()))
    # every scale contributes, and the coarsest summand is smooth (upsampled from 2×2)
    assert all(float(s.detach().abs().max()) > 0 for s in net.summands.values())
    u.square().sum().backward()
    assert all(
        h.weight.grad is not None and float(h.weight.grad.abs().max()) > 0
        for h in net.heads.values()
    )


def test_bad_configurations_and_inputs() -> None:
    with pytest.raises(ValueError, match="divide the next"):
        LocalNet(2, 2, (4, 6))
    with pytest.raises(ValueError, match="ddf_levels within 0..2"):
        LocalNet(2, 2, (4, 8), ddf_levels=[5])
    with pytest.raises(ValueError, match="divisible by 4"):
        LocalNet(2, 2, (4, 8))(torch.rand(1, 2, 10, 12))
    only_fine = LocalNet(2, 2, (4, 8), ddf_levels=[0])
    only_fine(torch.rand(1, 2, 8, 8))
    assert list(only_fine.summands) == [0]
