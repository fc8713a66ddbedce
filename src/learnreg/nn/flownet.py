"""FlowNet's encoder–decoder (Dosovitskiy et al., ICCV 2015), 2D and 3D.

Contracting part (Fig. 2 of the paper; the Caffe model's layers, ``(channels, kernel,
stride)``): ``conv1 (64, 7, 2)``, ``conv2 (128, 5, 2)``, ``conv3 (256, 5, 2)``, ``conv3_1
(256, 3, 1)``, ``conv4 (512, 3, 2)``, ``conv4_1 (512, 3, 1)``, ``conv5 (512, 3, 2)``,
``conv5_1 (512, 3, 1)``, ``conv6 (1024, 3, 2)``, each followed by a leaky ReLU (slope 0.1).

* **FlowNetS** ("simple"): both images stacked as input channels.
* **FlowNetC** ("correlation"): ``conv1``–``conv3`` run on each image with shared weights
  (siamese streams); a local correlation layer (:class:`~learnreg.nn.correlation.
  LocalCorrelation`) compares the two ``conv3`` maps over a window of displacements; its
  output, concatenated with ``conv_redir`` (a 1×1 conv to 32 channels of the first image's
  ``conv3``), feeds ``conv3_1`` and the rest of the encoder.

Expanding part ("refinement", Fig. 3): from ``conv6`` a 3×3 conv predicts a flow; then at
each finer level a 4×4 stride-2 transposed conv ("upconvolution", 512, 256, 128, 64
channels) of the previous features is concatenated with the encoder features of that size
(``conv5_1``, ``conv4_1``, ``conv3_1``, ``conv2``) and the previous flow upsampled by a 4×4
stride-2 transposed conv, and a 3×3 conv predicts the flow of that level. The finest flow is
at 1/4 of the input size (``flow2``); :meth:`FlowNet.forward` returns all of them, finest
first. ``width`` scales every channel count (1.0 is the paper's network). Weights start as
FlowNet's did (MSRA / Kaiming-normal for the leaky ReLUs, zero biases): with PyTorch's default
initialization the activations shrink layer by layer and FlowNetC's correlation of two
``conv3`` maps starts near 1e-4, too small to learn from (measured: no progress in 2000 steps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from learnreg.nn.blocks import CoordConv, conv_nd
from learnreg.nn.correlation import LocalCorrelation

__all__ = ["FLOWNET_ENCODER", "FLOWNET_DECODER", "FlowNet"]

#: ``(name, channels, kernel, stride)`` of FlowNet's contracting part (the paper's network).
FLOWNET_ENCODER = (
    ("conv1", 64, 7, 2),
    ("conv2", 128, 5, 2),
    ("conv3", 256, 5, 2),
    ("conv3_1", 256, 3, 1),
    ("conv4", 512, 3, 2),
    ("conv4_1", 512, 3, 1),
    ("conv5", 512, 3, 2),
    ("conv5_1", 512, 3, 1),
    ("conv6", 1024, 3, 2),
)
#: Channels of the upconvolutions ``deconv5`` … ``deconv2``.
FLOWNET_DECODER = (512, 256, 128, 64)
_SKIPS = ("conv5_1", "conv4_1", "conv3_1", "conv2")
_SIAMESE = 3  # FlowNetC: conv1..conv3 per image
_REDIRECT = 32


def _scaled(channels: int, width: float) -> int:
    return max(2, round(channels * width))


def _conv(ndim: int, cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    conv = conv_nd(ndim)(cin, cout, kernel, stride=stride, padding=kernel // 2)
    return nn.Sequential(conv, nn.LeakyReLU(0.1, inplace=True))


def _upconv(ndim: int, cin: int, cout: int) -> nn.Module:
    up = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
    return up(cin, cout, 4, stride=2, padding=1)


class FlowNet(nn.Module):
    """FlowNetS (``correlation=None``) or FlowNetC (``correlation`` a
    :class:`~learnreg.nn.correlation.LocalCorrelation`) of ``ndim`` dimensions.

    Args:
        ndim: 2 (the paper) or 3 (the same layers with 3D convolutions).
        in_channels: channels of each image (1 for grayscale).
        width: multiplier of every channel count (1.0: the paper).
        correlation: the correlation layer of FlowNetC, or None for FlowNetS.
        coord_conv: ``conv1`` is a CoordConv (Liu et al. 2018: normalized coordinate channels
            appended to its input).

    ``forward(first, second)`` with inputs ``(N, C, *S)`` (sizes divisible by 64) returns
    the flows ``[flow2, flow3, flow4, flow5, flow6]`` ``(N, ndim, *S / 2**k)``, in whatever
    units the training target gives them (FlowNet: pixels of the input / 20).
    """

    def __init__(
        self,
        ndim: int = 2,
        in_channels: int = 1,
        width: float = 1.0,
        correlation: LocalCorrelation | None = None,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"FlowNet: width must be > 0, got {width}")
        self.ndim, self.correlation = ndim, correlation
        ch = {name: _scaled(c, width) for name, c, _, _ in FLOWNET_ENCODER}
        self.encoder = nn.ModuleDict()
        prev = in_channels if correlation is not None else 2 * in_channels
        for i, (name, _, kernel, stride) in enumerate(FLOWNET_ENCODER):
            if correlation is not None and i == _SIAMESE:
                redirect = _scaled(_REDIRECT, width)
                self.redirect = _conv(ndim, prev, redirect, 1, 1)
                prev = correlation.out_channels(ndim) + redirect
            if i == 0 and coord_conv:
                opts = {"stride": stride, "kernel_size": kernel, "negative_slope": 0.1}
                self.encoder[name] = CoordConv(ndim, prev, ch[name], **opts)
            else:
                self.encoder[name] = _conv(ndim, prev, ch[name], kernel, stride)
            prev = ch[name]
        self.predict = nn.ModuleList([conv_nd(ndim)(prev, ndim, 3, padding=1)])
        self.deconv, self.upflow = nn.ModuleList(), nn.ModuleList()
        for skip, channels in zip(_SKIPS, FLOWNET_DECODER, strict=True):
            out = _scaled(channels, width)
            self.deconv.append(nn.Sequential(_upconv(ndim, prev, out), nn.LeakyReLU(0.1, True)))
            self.upflow.append(_upconv(ndim, ndim, ndim))
            prev = ch[skip] + out + ndim
            self.predict.append(conv_nd(ndim)(prev, ndim, 3, padding=1))
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d):
                nn.init.kaiming_normal_(module.weight, a=0.1, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)

    @property
    def size_multiple(self) -> int:
        """Input sizes must be multiples of this (six stride-2 convolutions)."""
        return 2 ** sum(1 for *_, stride in FLOWNET_ENCODER if stride == 2)

    def check_sizes(self, shape: Sequence[int]) -> None:
        m = self.size_multiple
        if any(int(s) % m for s in shape):
            raise ValueError(f"FlowNet: input sizes must be multiples of {m}, got {tuple(shape)}")

    def encode(self, first: Tensor, second: Tensor) -> dict[str, Tensor]:
        """The contracting part's activations by layer name."""
        self.check_sizes(first.shape[2:])
        layers = list(self.encoder.items())
        acts: dict[str, Tensor] = {}
        if self.correlation is None:
            x = torch.cat([first, second], 1)
            start = 0
        else:
            a, b = first, second
            for name, layer in layers[:_SIAMESE]:
                a, b = layer(a), layer(b)
                acts[name] = a
            x = torch.cat([self.correlation(a, b), self.redirect(a)], 1)
            start = _SIAMESE
        for name, layer in layers[start:]:
            x = layer(x)
            acts[name] = x
        return acts

    def forward(self, first: Tensor, second: Tensor) -> list[Tensor]:
        acts = self.encode(first, second)
        x = acts["conv6"]
        flows = [self.predict[0](x)]
        for skip, deconv, upflow, predict in zip(
            _SKIPS, self.deconv, self.upflow, self.predict[1:], strict=True
        ):
            x = torch.cat([acts[skip], deconv(x), upflow(flows[-1])], 1)
            flows.append(predict(x))
        return flows[::-1]
