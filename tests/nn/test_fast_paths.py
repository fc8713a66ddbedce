"""The CPU fast paths behind VoxelMorph's speed: same values as the plain computations.

* the UNet runs in channels-last memory format (state dict unchanged, values unchanged up to
  float rounding, 2D and 3D);
* FlowHead evaluates its conv tap by tap along axis 0 (same values and gradients);
* ``warp`` builds grid_sample coordinates axis by axis, bitwise equal to
  ``Grid.index_to_grid_sample`` of ``x + u(x)``;
* grid_sample of one image runs on all intra-op threads by splitting the output points into
  a batch of stride-0 views (bitwise equal values, equal gradients);
* ``integrate_velocity`` sums in place, bitwise equal to repeated ``compose_displacements``,
  and recomputes its squarings in backward (same gradients, one field kept).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from learnreg.core.grid import Grid
from learnreg.methods.registry import create_method
from learnreg.nn.blocks import FlowHead
from learnreg.nn.unet import UNet
from learnreg.spatial import sampling, svf
from learnreg.spatial.fields import compose_displacements
from learnreg.spatial.sampling import displaced_grid_sample_coords, sample, warp
from learnreg.spatial.svf import integrate_velocity


@pytest.fixture
def two_threads(monkeypatch):
    """Two intra-op threads and the threaded grid_sample enabled at any size."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(sampling, "_PARALLEL_MIN_POINTS", 1)
    yield
    torch.set_num_threads(old)


def _reference_unet(net: UNet, x: torch.Tensor) -> torch.Tensor:
    """The UNet's forward pass with plain channels-first tensors."""
    history = [x]
    for block in net.encoder:
        history.append(block(history[-1].contiguous()).contiguous())
    y = history.pop()
    for i, block in enumerate(net.decoder):
        y = block(y.contiguous()).contiguous()
        if i < net.depth:
            y = torch.cat([F.interpolate(y, scale_factor=2, mode="nearest"), history.pop()], 1)
    return y


@pytest.mark.parametrize("ndim,shape", [(2, (32, 48)), (3, (16, 32, 16))])
@pytest.mark.parametrize(
    "norm,dtype",
    # instance norm over the 2 voxels of the deepest level amplifies float32 rounding
    [(None, torch.float32), ("instance", torch.float64)],
)
def test_unet_channels_last_same_values_and_gradients(ndim, shape, norm, dtype):
    torch.manual_seed(0)
    net = UNet(ndim, 2, norm=norm).to(dtype)
    x = torch.rand(2, 2, *shape, dtype=dtype)
    y = net(x)
    cl = torch.channels_last if ndim == 2 else torch.channels_last_3d
    assert y.is_contiguous(memory_format=cl)
    ref = _reference_unet(net, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, list(net.parameters()), g)
    ref_grads = torch.autograd.grad(ref, list(net.parameters()), g)
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-6


def test_flow_head_output_is_contiguous():
    x = torch.rand(1, 16, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    assert FlowHead(3, 16)(x).is_contiguous()


@pytest.mark.parametrize(
    "ndim,shape", [(2, (20, 24)), (2, (1, 5)), (3, (6, 8, 10)), (3, (1, 8, 10)), (3, (2, 8, 10))]
)
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_flow_head_tap_by_tap_conv_equals_the_conv(ndim, shape, kernel_size):
    """FlowHead's CPU path (one kernel-1 conv per axis-0 tap, summed shifted) = its conv."""
    torch.manual_seed(0)
    head = FlowHead(ndim, 16, std=0.1, bias=0.3, kernel_size=kernel_size).double()
    x = torch.randn(2, 16, *shape, dtype=torch.float64, requires_grad=True)
    out, ref = head(x), head.conv(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = [x, head.conv.weight, head.conv.bias]
    grads = torch.autograd.grad(out.square().sum(), params)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_voxelmorph_state_dict_layout_is_unchanged():
    """The layout trained checkpoints rely on (keys and shapes of the default VoxelMorph)."""
    method = create_method("voxelmorph", ndim=3)
    enc = [(2, 16), (16, 32), (32, 32), (32, 32)]
    dec = [(32, 32), (64, 32), (64, 32), (48, 32), (34, 32), (32, 16), (16, 16)]
    expected = {}
    for name, pairs in (("encoder", enc), ("decoder", dec)):
        for i, (cin, cout) in enumerate(pairs):
            expected[f"unet.{name}.{i}.conv.weight"] = (cout, cin, 3, 3, 3)
            expected[f"unet.{name}.{i}.conv.bias"] = (cout,)
    expected["flow.conv.weight"] = (3, 16, 3, 3, 3)
    expected["flow.conv.bias"] = (3,)
    got = {k: tuple(v.shape) for k, v in method.state_dict().items()}
    assert got == expected


@pytest.mark.parametrize(
    "shape", [(5, 7), (1, 9), (40, 50), (4, 1, 6), (16, 32, 16), (3, 1, 1)], ids=str
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_displaced_coords_bitwise_equal_to_grid_maps(shape, dtype):
    torch.manual_seed(0)
    u = torch.randn(2, len(shape), *shape, dtype=dtype) * 3
    g = Grid(shape)
    ref = g.index_to_grid_sample(g.index_points(dtype) + u.movedim(1, -1))
    assert torch.equal(displaced_grid_sample_coords(u), ref)


@pytest.mark.parametrize("shape", [(64, 80), (12, 16, 20), (6, 1, 10)], ids=str)
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_threaded_grid_sample_bitwise_equal(two_threads, shape, padding, mode):
    torch.manual_seed(0)
    img = torch.rand(1, 3, *shape)
    coords = torch.rand(1, *shape, len(shape)) * 2.4 - 1.2
    out = sample(img, coords, mode, padding)
    torch.set_num_threads(1)  # the plain single-threaded kernel
    assert torch.equal(out, sample(img, coords, mode, padding))


@pytest.mark.parametrize("shape", [(24, 30), (10, 12, 14)], ids=str)
def test_threaded_grid_sample_gradients(two_threads, shape):
    torch.manual_seed(0)
    d = len(shape)
    img = torch.rand(1, 2, *shape, dtype=torch.float64, requires_grad=True)
    u = (torch.randn(1, d, *shape, dtype=torch.float64) * 2).requires_grad_()
    out = warp(img, u, padding="border")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (img, u), g)
    coords = Grid(shape).index_to_grid_sample(Grid(shape).index_points(u.dtype) + u.movedim(1, -1))
    ref = F.grid_sample(img, coords, padding_mode="border", align_corners=True)
    assert torch.equal(out, ref)
    ref_grads = torch.autograd.grad(ref, (img, u), g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(20, 24), (8, 10, 12)], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_integrate_velocity_equals_repeated_composition(monkeypatch, shape, threads):
    monkeypatch.setattr(sampling, "_PARALLEL_MIN_POINTS", 1)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        v = (torch.randn(1, len(shape), *shape) * 3).requires_grad_()
        u = integrate_velocity(v, 6)
        ref = v / 2**6
        for _ in range(6):
            ref = compose_displacements(ref, ref, "border")
        assert torch.equal(u, ref)
        g = torch.randn_like(u)
        (a,) = torch.autograd.grad(u, v, g)
        (b,) = torch.autograd.grad(ref, v, g)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(old)


def test_integrate_velocity_graph_keeps_at_most_one_field(monkeypatch):
    """The squarings are recomputed in backward: the graph holds no per-step fields (for
    fields of CHECKPOINT_MIN values and more; lowered here to keep the test small)."""
    monkeypatch.setattr(svf, "CHECKPOINT_MIN", 1)
    v = torch.randn(1, 3, 8, 10, 12, requires_grad=True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        u = integrate_velocity(v, 6)
    assert sum(saved) <= v.numel(), saved
    u.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()
