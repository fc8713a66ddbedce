"""Quicksilver's patch network (Yang, Kwitt, Styner and Niethammer, NeuroImage 2017).

Two encoders of the same architecture but their own weights (one for the moving patch, one
for the target patch), each two blocks of three 3×3(×3) convolutions with PReLU and a 2×2(×2)
stride-2 convolution that halves the patch (15 → 8 → 5); their features concatenated; one
decoder per output component (``D`` decoders: three in 3D), each two blocks of a stride-2
transposed convolution (5 → 8 → 15) and three 3×3(×3) convolutions, the last one linear. The
paper: 64 features in the first encoder block (128 in the second), dropout 0.2 after the
PReLUs in its probabilistic variant.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from learnreg.nn.blocks import CoordConv, conv_nd

__all__ = ["MomentumPatchNet"]


def _transposed(ndim: int) -> type[nn.ConvTranspose2d] | type[nn.ConvTranspose3d]:
    return nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d


def _dropout(rate: float) -> nn.Module:
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class _Encoder(nn.Module):
    def __init__(
        self, ndim: int, cin: int, cout: int, dropout: float, coord_conv: bool = False
    ) -> None:
        super().__init__()
        conv = conv_nd(ndim)
        # CoordConv: the first layer also sees where the patch lies in the whole image
        self.coord = CoordConv(ndim, cin, cout, negative_slope=0.25) if coord_conv else None
        layers: list[nn.Module] = [] if coord_conv else [conv(cin, cout, 3, padding=1), nn.PReLU()]
        layers.append(_dropout(dropout))
        for _ in range(2):
            layers += [conv(cout, cout, 3, padding=1), nn.PReLU(), _dropout(dropout)]
        self.body = nn.Sequential(*layers)
        self.pool = nn.Sequential(conv(cout, cout, 2, stride=2, padding=1), nn.PReLU())

    def forward(self, x: Tensor, coords: Tensor | None = None) -> Tensor:
        if self.coord is not None:
            x = self.coord(x, coords)
        return self.pool(self.body(x))


class _Decoder(nn.Module):
    def __init__(
        self, ndim: int, cin: int, cout: int, kernel: int, dropout: float, last: bool
    ) -> None:
        super().__init__()
        conv = conv_nd(ndim)
        self.unpool = nn.Sequential(_transposed(ndim)(cin, cin, kernel, 2, 1), nn.PReLU())
        layers: list[nn.Module] = []
        for _ in range(2):
            layers += [conv(cin, cin, 3, padding=1), nn.PReLU(), _dropout(dropout)]
        layers.append(conv(cin, cout, 3, padding=1))
        if not last:
            layers += [nn.PReLU(), _dropout(dropout)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.unpool(x))


class MomentumPatchNet(nn.Module):
    """``(moving, target)`` patches ``(N, 1, 15, ...)`` → a momentum patch ``(N, D, 15, ...)``.

    Args:
        ndim: 2 or 3.
        features: channels of the first encoder block (the second has twice as many).
        dropout: rate after the PReLUs (0: the deterministic network).
        coord_conv: the first layer of each encoder is a CoordConv fed the patch's
            coordinates in the whole image (``D`` more input channels after the two images).
    """

    patch = 15

    def __init__(
        self, ndim: int = 3, features: int = 64, dropout: float = 0.0, coord_conv: bool = False
    ) -> None:
        super().__init__()
        if ndim not in (2, 3) or features < 1 or not 0 <= dropout < 1:
            raise ValueError(
                f"MomentumPatchNet: ndim 2 or 3, features >= 1, dropout in [0, 1); got "
                f"{ndim}, {features}, {dropout}"
            )
        self.ndim, f, self.coord_conv = ndim, int(features), bool(coord_conv)
        self.in_channels = 2 + (ndim if coord_conv else 0)
        self.moving_encoder = nn.ModuleList(
            [_Encoder(ndim, 1, f, dropout, coord_conv), _Encoder(ndim, f, 2 * f, dropout)]
        )
        self.target_encoder = nn.ModuleList(
            [_Encoder(ndim, 1, f, dropout, coord_conv), _Encoder(ndim, f, 2 * f, dropout)]
        )
        self.decoders = nn.ModuleList(
            nn.Sequential(
                _Decoder(ndim, 4 * f, 2 * f, 2, dropout, last=False),
                _Decoder(ndim, 2 * f, 1, 3, dropout, last=True),
            )
            for _ in range(ndim)
        )
        self._initialize()

    def _initialize(self) -> None:
        """He initialization for PReLU (slope 0.25) so the 16-layer path keeps its signal
        (PyTorch's default scaling shrinks it ~1e4-fold over the layers, and the gradients
        reaching the encoders with it: measured 1e-9)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d):
                nn.init.kaiming_normal_(module.weight, a=0.25, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)

    def forward(self, pair: Tensor) -> Tensor:
        """``pair`` ``(N, 2, 15, ...)``: moving and target patches stacked (with
        ``coord_conv``, then their ``D`` coordinate channels)."""
        want = (self.in_channels, *(self.patch,) * self.ndim)
        if pair.dim() != self.ndim + 2 or tuple(pair.shape[1:]) != want:
            raise ValueError(
                f"MomentumPatchNet: patches must be (N, {want}); got {tuple(pair.shape)}"
            )
        coords = pair[:, 2:] if self.coord_conv else None
        codes = [
            second(first(image, coords))
            for (first, second), image in zip(
                (self.moving_encoder, self.target_encoder), pair[:, :2].split(1, 1), strict=True
            )
        ]
        code = torch.cat(codes, 1)
        return torch.cat([decode(code) for decode in self.decoders], 1)
