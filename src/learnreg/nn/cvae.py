"""A conditional variational auto-encoder of dense fields (Krebs et al.'s registration CVAE)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnreg.nn.blocks import ConvBlock, CoordConv, FlowHead

__all__ = ["ConditionalVAE"]


class ConditionalVAE(nn.Module):
    """Encoder of an image pair to ``q(z) = N(μ, σ²)`` and decoder of ``z`` to dense fields at
    1/4, 1/2 and 1 of ``shape``, conditioned on an image given at each decoder scale.

    Encoder: four stride-2 conv blocks (``enc_features``; the first a CoordConv with
    ``coord_conv``) on the 2-channel input, flattened, two linear layers to ``μ`` and
    ``log σ²`` (the latter starting at −4). Decoder: a linear layer from ``z`` to a
    ``dec_features[0]``-channel map at 1/8, then one conv block per scale (1/8, 1/4, 1/2, 1,
    nearest upsampling between them), each fed the condition at its scale as an extra channel;
    a field head after each of the last three. The fully connected layers fix ``shape``
    (sizes divisible by 8).
    """

    def __init__(
        self,
        ndim: int,
        shape: Sequence[int],
        latent: int = 32,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 16),
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != ndim or any(s % 8 or s < 8 for s in self.shape):
            raise ValueError(f"shape must be {ndim} sizes divisible by 8, got {self.shape}")
        if len(enc_features) != 4 or len(dec_features) != 4 or latent < 1:
            raise ValueError("enc_features and dec_features need 4 entries each, latent >= 1")
        enc, cin = [], 2
        for i, f in enumerate(enc_features):
            block = CoordConv if coord_conv and i == 0 else ConvBlock
            enc.append(block(ndim, cin, int(f), stride=2))
            cin = int(f)
        self.encoder = nn.Sequential(*enc)
        encoded = self.shape
        for _ in enc_features:  # each stride-2 convolution (padding 1) halves, rounding up
            encoded = tuple(-(-s // 2) for s in encoded)
        flat = cin * int(torch.tensor(encoded).prod())
        self.to_mean = nn.Linear(flat, int(latent))
        self.to_log_variance = nn.Linear(flat, int(latent))
        nn.init.zeros_(self.to_log_variance.weight)
        nn.init.constant_(self.to_log_variance.bias, -4.0)
        self.coarse = tuple(s // 8 for s in self.shape)
        c0 = int(dec_features[0])
        self.from_latent = nn.Linear(int(latent), c0 * int(torch.tensor(self.coarse).prod()))
        blocks, cin = [], c0
        for f in dec_features:
            blocks.append(ConvBlock(ndim, cin + 1, int(f)))  # + the condition at that scale
            cin = int(f)
        self.decoder = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(FlowHead(ndim, int(f)) for f in dec_features[1:])

    def decoder_shapes(self) -> list[tuple[int, ...]]:
        """The grid sizes of the decoder blocks: 1/8, 1/4, 1/2 and 1 of :attr:`shape`."""
        return [tuple(s // f for s in self.shape) for f in (8, 4, 2, 1)]

    def encode(self, pair: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ, log σ²)`` ``(N, latent)`` of a pair ``(N, 2, *shape)``."""
        h = self.encoder(pair).flatten(1)
        return self.to_mean(h), self.to_log_variance(h)

    def decode(self, z: Tensor, conditions: Sequence[Tensor]) -> list[Tensor]:
        """Fields at 1/4, 1/2 and 1 from ``z`` and the condition ``(N, 1, *S)`` at each of
        :meth:`decoder_shapes`."""
        x = self.from_latent(z).view(z.shape[0], -1, *self.coarse)
        fields = []
        for i, (block, condition) in enumerate(zip(self.decoder, conditions, strict=True)):
            if i:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([x, condition], 1))
            if i:
                fields.append(self.heads[i - 1](x))
        return fields
