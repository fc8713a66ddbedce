"""A feature network learned on the training images: a convolutional auto-encoder (2D/3D).

Perceptual (feature-space) distances need a feature network; VGG ImageNet weights are not
available offline, so learnreg learns one itself: :class:`ConvAutoencoder` is trained to
reconstruct real images, and its :class:`FeatureEncoder` gives the multi-level features a
method compares (Mahapatra 2018's VGG content loss). :func:`feature_distance` compares two
images' features without letting gradients reach the encoder's weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from learnreg.nn.blocks import ConvBlock, conv_nd

__all__ = ["FeatureEncoder", "ConvAutoencoder", "feature_distance"]


def _features(ndim: int, features: Sequence[int], what: str) -> list[int]:
    feats = [int(f) for f in features]
    if ndim not in (2, 3) or not feats or min(feats) < 1:
        raise ValueError(
            f"{what}: need ndim 2 or 3 and at least one positive feature count; got {ndim}, "
            f"{tuple(features)}"
        )
    return feats


class FeatureEncoder(nn.Module):
    """``len(features)`` levels, each a conv block of stride 2 then one of stride 1 (kernel 3,
    LeakyReLU 0.2); ``forward`` returns every level's activation, finest first, as VGG's
    per-stage features. Spatial sizes must be multiples of :attr:`size_multiple`."""

    def __init__(
        self,
        ndim: int,
        in_channels: int = 1,
        features: Sequence[int] = (16, 32, 64),
        norm: str | None = None,
    ) -> None:
        super().__init__()
        feats = _features(ndim, features, "FeatureEncoder")
        self.levels = nn.ModuleList()
        cin = int(in_channels)
        for f in feats:
            self.levels.append(
                nn.Sequential(
                    ConvBlock(ndim, cin, f, stride=2, norm=norm), ConvBlock(ndim, f, f, norm=norm)
                )
            )
            cin = f
        self.ndim, self.in_channels, self.features = ndim, int(in_channels), tuple(feats)

    @property
    def size_multiple(self) -> int:
        return 2 ** len(self.features)

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FeatureEncoder: expected (N, {self.in_channels}, *S) with {self.ndim} "
                f"spatial dims, got {tuple(x.shape)}"
            )
        bad = [s for s in x.shape[2:] if s % self.size_multiple]
        if bad:
            raise ValueError(
                f"FeatureEncoder: spatial sizes must be multiples of {self.size_multiple}, got "
                f"{tuple(x.shape[2:])}"
            )
        out = []
        for level in self.levels:
            x = level(x)
            out.append(x)
        return out


class ConvAutoencoder(nn.Module):
    """:class:`FeatureEncoder` + a decoder (per level: ×2 nearest upsampling, conv block; a
    final kernel-3 conv to ``in_channels``) trained by :meth:`reconstruction_loss`."""

    def __init__(
        self,
        ndim: int,
        in_channels: int = 1,
        features: Sequence[int] = (16, 32, 64),
        norm: str | None = None,
    ) -> None:
        super().__init__()
        self.encoder = FeatureEncoder(ndim, in_channels, features, norm)
        feats = list(self.encoder.features)
        ups, cin = [], feats[-1]
        for f in [*feats[-2::-1], feats[0]]:
            ups.append(ConvBlock(ndim, cin, f, norm=norm))
            cin = f
        self.decoder = nn.ModuleList(ups)
        self.out = conv_nd(ndim)(cin, in_channels, 3, padding=1)

    @property
    def size_multiple(self) -> int:
        return self.encoder.size_multiple

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of ``x``."""
        y = self.encoder(x)[-1]
        for block in self.decoder:
            y = block(F.interpolate(y, scale_factor=2, mode="nearest"))
        return self.out(y)

    def reconstruction_loss(self, images: Tensor) -> Tensor:
        """Mean absolute reconstruction error of ``images`` (the images are not
        differentiated: the auto-encoder learns from real images only)."""
        images = images.detach()
        return (self(images) - images).abs().mean()


def feature_distance(encoder: FeatureEncoder, a: Tensor, b: Tensor) -> Tensor:
    """Mean over levels of the channel-normalized squared feature distance
    ``mean_x |f_a(x)/|f_a(x)| − f_b(x)/|f_b(x)||²`` (LPIPS-style unit-length features, so the
    distance does not drift with the scale of a feature network still being trained), in
    [0, 4]; one value for the batch.

    The encoder runs with detached copies of its weights: the distance is differentiable in
    ``a`` and ``b`` but puts no gradient into the encoder, whatever is back-propagated."""
    weights = {n: p.detach() for n, p in encoder.named_parameters()}
    weights.update(dict(encoder.named_buffers()))
    fa = functional_call(encoder, weights, (a,))
    fb = functional_call(encoder, weights, (b,))
    terms = [
        (F.normalize(x, dim=1, eps=1e-6) - F.normalize(y, dim=1, eps=1e-6)).square().sum(1).mean()
        for x, y in zip(fa, fb, strict=True)
    ]
    return torch.stack(terms).mean()
