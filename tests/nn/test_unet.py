"""U-Net and building blocks: shapes in 2D/3D, size checks, CoordConv, identity-start heads."""

from __future__ import annotations

import pytest
import torch

from learnreg.nn.blocks import AddCoords, ConvBlock, CoordConv, FlowHead
from learnreg.nn.unet import UNet


@pytest.mark.parametrize("ndim,shape", [(2, (32, 48)), (3, (16, 32, 16))])
def test_unet_shapes(ndim, shape):
    net = UNet(ndim, in_channels=2)
    y = net(torch.rand(2, 2, *shape))
    assert y.shape == (2, net.out_channels, *shape)
    assert net.out_channels == 16  # last of the VoxelMorph-2 decoder features


def test_unet_configurable_depth_and_features():
    net = UNet(2, in_channels=1, enc_features=(4, 8, 8), dec_features=(8, 8, 8))
    assert net.depth == 3
    assert net(torch.rand(1, 1, 24, 40)).shape == (1, net.out_channels, 24, 40)
    assert net.out_channels == 8 + 1  # no extra convs: last upsampling level + input skip
    with pytest.raises(ValueError, match="dec_features"):
        UNet(2, enc_features=(4, 8, 8), dec_features=(8, 8))


@pytest.mark.parametrize("shape,hint", [((30, 32), "(32, 32)"), ((33, 32), "(48, 32)")])
def test_unet_rejects_indivisible_sizes(shape, hint):
    net = UNet(2)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*depth = 16") as err:
        net(torch.rand(1, 2, *shape))
    assert hint in str(err.value)


def test_unet_rejects_wrong_channels_or_dims():
    net = UNet(3)
    with pytest.raises(ValueError, match=r"\(N, 2, \*S\) with 3 spatial dims"):
        net(torch.rand(1, 2, 16, 16))
    with pytest.raises(ValueError, match="ndim"):
        UNet(4)


@pytest.mark.parametrize("norm", [None, "batch", "instance", "group"])
def test_conv_block_norms_and_stride(norm):
    block = ConvBlock(3, 2, 8, stride=2, norm=norm)
    assert block(torch.rand(2, 2, 8, 8, 8)).shape == (2, 8, 4, 4, 4)
    with pytest.raises(ValueError, match="norm must be one of"):
        ConvBlock(2, 2, 8, norm="layer")


def test_add_coords_index_order_2d_3d():
    out = AddCoords(2)(torch.zeros(2, 1, 3, 5))
    assert out.shape == (2, 3, 3, 5)
    assert torch.allclose(out[0, 1, :, 0], torch.tensor([-1.0, 0.0, 1.0]))  # along axis 0
    assert torch.allclose(out[0, 2, 0], torch.linspace(-1, 1, 5))  # along axis 1
    out3 = AddCoords(3)(torch.zeros(1, 2, 2, 3, 4))
    assert out3.shape == (1, 5, 2, 3, 4)
    for d, n in enumerate((2, 3, 4)):
        c = out3[0, 2 + d].movedim(d, 0).reshape(n, -1)
        assert torch.allclose(c, torch.linspace(-1, 1, n)[:, None].expand_as(c))
    assert torch.equal(AddCoords(2)(torch.zeros(1, 1, 1, 3))[0, 1], torch.zeros(1, 3))


def test_coord_conv_and_unet_option():
    assert CoordConv(2, 1, 4)(torch.rand(1, 1, 8, 8)).shape == (1, 4, 8, 8)
    net = UNet(2, coord_conv=True)
    assert net.encoder[0].block.conv.in_channels == 4
    assert net(torch.rand(1, 2, 32, 32)).shape == (1, 16, 32, 32)


def test_flow_head_starts_near_identity():
    torch.manual_seed(0)
    head = FlowHead(3, 16)
    assert torch.count_nonzero(head.conv.bias) == 0
    assert head.conv.weight.std() < 3e-5
    u = head(torch.rand(1, 16, 8, 8, 8))
    assert u.shape == (1, 3, 8, 8, 8) and u.abs().max() < 1e-3
    logvar = FlowHead(2, 4, std=1e-10, bias=-10.0)(torch.rand(1, 4, 4, 4))
    assert torch.allclose(logvar, torch.full_like(logvar, -10.0))
