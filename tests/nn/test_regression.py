"""Parameter-regression building blocks: VGG encoder, pair encoders, regression head."""

from __future__ import annotations

import pytest
import torch

from learnreg.nn.blocks import CoordConv
from learnreg.nn.regression import PairEncoder, ParameterRegressor, RegressionHead, VGGEncoder


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [("max", (16, 4, 4)), ("avg", (16, 4, 4)), ("stride", (16, 4, 4)), (None, (16, 32, 32))],
)
def test_vgg_encoder_downsampling(pooling, expected) -> None:
    enc = VGGEncoder(2, 2, (8, 8, 16, 16), downsample_after=(0, 1, 2), pooling=pooling)
    out = enc(torch.rand(2, 2, 32, 32))
    assert out.shape == (2, *expected)
    assert enc.output_shape((32, 32)) == expected[1:]
    n_pool = sum(isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)) for m in enc.modules())
    assert n_pool == (3 if pooling in ("max", "avg") else 0)
    assert (out >= 0).all()  # ReLU (negative slope 0) by default


def test_vgg_encoder_odd_sizes_3d_and_coordconv() -> None:
    enc = VGGEncoder(2, 1, (4, 4), downsample_after=(0,), pooling="stride")
    assert enc(torch.rand(1, 1, 33, 17)).shape[2:] == enc.output_shape((33, 17)) == (17, 9)
    enc3 = VGGEncoder(3, 2, (4, 8), downsample_after=(0,), coord_conv=True)
    assert isinstance(enc3.layers[0], CoordConv)
    assert enc3.layers[0].block.conv.in_channels == 2 + 3
    assert enc3(torch.rand(1, 2, 8, 8, 8)).shape == (1, 8, 4, 4, 4)


def test_pair_encoder_modes_share_weights_as_named() -> None:
    kw = {"features": (4, 8), "downsample_after": (0,), "norm": None}
    two = PairEncoder(2, "two-channel", **kw)
    siam = PairEncoder(2, "siamese", merge_features=(6,), **kw)
    pseudo = PairEncoder(2, "pseudo-siamese", **kw)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert two.tower.layers[0].conv.in_channels == 2
    assert count(pseudo) == 2 * count(siam.tower)
    assert siam.output_shape((16, 16)) == (6, 8, 8) and pseudo.output_shape((16, 16)) == (16, 8, 8)
    a, b = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    # siamese without merge trunk: swapping the images swaps the two feature halves
    plain = PairEncoder(2, "siamese", **kw).eval()
    fa, fb = plain(a, b), plain(b, a)
    torch.testing.assert_close(fa[:, :8], fb[:, 8:])
    torch.testing.assert_close(fa[:, 8:], fb[:, :8])
    assert siam(a, b).shape == (2, 6, 8, 8)
    with pytest.raises(ValueError, match="same shape"):
        siam(a, b[:, :, :8])
    with pytest.raises(ValueError, match="mode"):
        PairEncoder(2, "triplet")


def test_regression_head_starts_at_its_bias() -> None:
    x = torch.randn(3, 10)
    zero = RegressionHead(10, 4, hidden=(8,), dropout=0.5, init_std=0.0, bias=[1.0, 0, 0, 1.0])
    torch.testing.assert_close(zero.eval()(x), torch.tensor([[1.0, 0, 0, 1.0]]).expand(3, 4))
    small = RegressionHead(10, 8, hidden=(16,), dropout=0.0).eval()
    assert small(x).abs().max() < 0.05
    with pytest.raises(ValueError, match="bias"):
        RegressionHead(10, 4, bias=[0.0, 1.0])
    with pytest.raises(ValueError, match="features per item"):
        small(torch.randn(3, 12))
    with pytest.raises(ValueError, match="dropout"):
        RegressionHead(10, 4, dropout=1.0)


def test_regression_head_batch_norm_keeps_hidden_units_alive() -> None:
    """``norm="batch"``: each hidden unit is centred over the batch before its ReLU, so no
    shift of its weights can switch it off for every input (plain heads keep their layout)."""
    plain = RegressionHead(10, 4, hidden=(8,), dropout=0.0)
    assert [type(m).__name__ for m in plain.hidden] == ["Flatten", "Linear", "ReLU"]
    head = RegressionHead(10, 4, hidden=(8,), dropout=0.0, norm="batch")
    assert [type(m).__name__ for m in head.hidden] == ["Flatten", "Linear", "BatchNorm1d", "ReLU"]
    with torch.no_grad():
        head.hidden[1].weight.fill_(-1.0)  # every unit negative for positive inputs
    x = torch.rand(16, 10)
    h = head.train().hidden(x)
    assert bool((h > 0).any(0).all())  # every unit still active for some inputs
    assert head(x).shape == (16, 4) and head.eval()(x[:1]).shape == (1, 4)
    with pytest.raises(ValueError, match="at least 2"):
        head.train()(x[:1])
    with pytest.raises(ValueError, match="head norm"):
        RegressionHead(10, 4, norm="instance")


def test_parameter_regressor_shapes_and_checks() -> None:
    net = ParameterRegressor(
        2, (32, 32), 8, {"features": (4, 4, 8, 8), "downsample_after": (1,)}, {"hidden": (16,)}
    )
    assert net(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)).shape == (2, 8)
    with pytest.raises(ValueError, match="built for images of size"):
        net(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="too small"):
        ParameterRegressor(2, (4, 4), 8, {"features": (4, 4, 4), "downsample_after": (0, 1, 2)})
    with pytest.raises(ValueError, match="outside"):
        VGGEncoder(2, 1, (4, 4), downsample_after=(5,))
    with pytest.raises(ValueError, match="pooling"):
        VGGEncoder(2, 1, (4,), pooling="median")


def test_parameter_regressor_learns_a_translation_from_real_images() -> None:
    """A tiny two-channel regressor learns the shift between crops of a real photo."""
    skdata = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skdata.camera()).float() / 255
    img = torch.nn.functional.avg_pool2d(img[None, None], 4)[0, 0]  # 128 × 128
    g = torch.Generator().manual_seed(0)

    def batch(n: int):
        shift = torch.randint(-4, 5, (n, 2), generator=g)
        pos = torch.randint(8, 128 - 24 - 8, (n, 2), generator=g)
        f = torch.stack([img[i : i + 24, j : j + 24] for i, j in pos.tolist()])
        m = torch.stack(
            [
                img[i + a : i + a + 24, j + b : j + b + 24]
                for (i, j), (a, b) in zip(pos.tolist(), shift.tolist(), strict=True)
            ]
        )
        return f[:, None], m[:, None], shift.float()

    torch.manual_seed(0)
    net = ParameterRegressor(
        2,
        (24, 24),
        2,
        {"features": (16, 16, 32, 32), "downsample_after": (0, 1)},
        {"hidden": (64,), "dropout": 0.0},
    )
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    tf, tm, ts = batch(256)
    base = (ts - ts.mean(0)).norm(dim=1).mean()
    for _ in range(300):
        f, m, s = batch(32)
        loss = (net(f, m) - s).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = (net.eval()(tf, tm) - ts).norm(dim=1).mean()
    assert err < 0.8 * base  # ~0.6 after 300 steps (the mean shift predicts 1.0)
