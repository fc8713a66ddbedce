"""The learned feature network: auto-encoder shapes in 2D/3D, input checks, and the feature
distance (zero for equal images, symmetric, bounded, no gradient into the encoder)."""

from __future__ import annotations

import pytest
import torch

from learnreg.nn.features import ConvAutoencoder, FeatureEncoder, feature_distance


@pytest.mark.parametrize("ndim,shape", [(2, (16, 24)), (3, (8, 16, 8))])
def test_autoencoder_shapes(ndim, shape) -> None:
    ae = ConvAutoencoder(ndim, 1, (4, 8))
    x = torch.rand(2, 1, *shape)
    assert ae(x).shape == x.shape and ae.size_multiple == 4
    feats = ae.encoder(x)
    assert [f.shape for f in feats] == [
        (2, 4, *[s // 2 for s in shape]),
        (2, 8, *[s // 4 for s in shape]),
    ]
    loss = ae.reconstruction_loss(x).detach()
    assert loss.dim() == 0 and float(loss) == pytest.approx(
        float((ae(x) - x).abs().mean().detach())
    )


def test_bad_inputs_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="at least one positive feature count"):
        FeatureEncoder(2, 1, ())
    with pytest.raises(ValueError, match="need ndim 2 or 3"):
        ConvAutoencoder(4, 1, (4,))
    enc = FeatureEncoder(2, 1, (4, 8))
    with pytest.raises(ValueError, match="multiples of 4"):
        enc(torch.rand(1, 1, 16, 18))
    with pytest.raises(ValueError, match=r"expected \(N, 1, \*S\) with 2 spatial dims"):
        enc(torch.rand(1, 2, 16, 16))


def test_feature_distance_properties_and_no_gradient_into_the_encoder() -> None:
    torch.manual_seed(0)
    enc = FeatureEncoder(2, 1, (4, 8))
    a, b = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16, requires_grad=True)
    assert float(feature_distance(enc, a, a)) == 0.0
    d = feature_distance(enc, a, b)
    value = float(d.detach())
    assert value == pytest.approx(float(feature_distance(enc, b, a).detach()), rel=1e-6)
    assert 0 < value <= 4
    d.backward()
    assert b.grad is not None and float(b.grad.abs().sum()) > 0
    assert all(p.grad is None for p in enc.parameters())
    # the same value as the encoder run with its own weights
    with torch.no_grad():
        fa, fb = enc(a), enc(b)
    n = torch.nn.functional.normalize
    want = (
        sum(
            ((n(x, dim=1, eps=1e-6) - n(y, dim=1, eps=1e-6)) ** 2).sum(1).mean()
            for x, y in zip(fa, fb, strict=True)
        )
        / 2
    )
    assert value == pytest.approx(float(want), rel=1e-5)
