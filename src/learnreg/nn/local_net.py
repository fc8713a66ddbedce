"""Hu et al.'s local network (MedIA 2018, label-reg's ``LocalNet``), 2D and 3D.

A residual U-Net whose displacement is the sum of fields predicted at several scales:

* **encoder**: per level a conv block and a residual block (two convs whose output is added
  to their input), then 2× max pooling; the level's features feed the decoder by summation;
* **bridge**: a conv block at the coarsest level;
* **decoder**: per level a transposed conv (×2), plus the coarser features resized and summed
  in groups of channels to the new width (label-reg's "additive upsampling"), plus the
  encoder features of that level (a summation skip), then a residual block;
* **displacement**: a 3×3 conv on the bridge and on each decoder level predicts a field
  ``(N, D, *S_k)`` (input voxels); each is resized to the input grid (linear), and the fields
  of the levels in ``ddf_levels`` are summed (label-reg: all of them, ``[0, 1, 2, 3, 4]``).
  The heads start at zero, so the first field is the identity.

Batch norm after every conv but the displacement heads, ReLU activations, as label-reg.
Channels: label-reg's ``32 · 2^k`` (32–512); smaller widths (``features``) for CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from learnreg.nn.blocks import conv_nd

__all__ = ["LocalNet"]


def _bn(ndim: int, channels: int) -> nn.Module:
    return (nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d)(channels)


class _ConvBN(nn.Sequential):
    def __init__(self, ndim: int, cin: int, cout: int, act: bool = True) -> None:
        layers: list[nn.Module] = [conv_nd(ndim)(cin, cout, 3, padding=1, bias=False)]
        layers.append(_bn(ndim, cout))
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _Residual(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))``."""

    def __init__(self, ndim: int, channels: int) -> None:
        super().__init__()
        self.a = _ConvBN(ndim, channels, channels)
        self.b = _ConvBN(ndim, channels, channels, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.b(self.a(x)))


def _additive_upsample(x: Tensor, size: Sequence[int], channels: int) -> Tensor:
    """``x`` resized to ``size`` (linear) and summed in ``C / channels`` groups of channels."""
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    y = F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)
    n, c = y.shape[:2]
    return y.view(n, channels, c // channels, *y.shape[2:]).sum(2)


class LocalNet(nn.Module):
    """Residual U-Net with multi-scale displacement summands (module docstring).

    Args:
        ndim: 2 or 3.
        in_channels: input channels (the moving and fixed images: 2).
        features: channels of the encoder levels (label-reg: 32, 64, 128, 256); the bridge
            has twice the last; each must divide the next level's (additive upsampling).
        ddf_levels: which levels add a displacement summand: 0 the finest decoder level,
            ``len(features)`` the bridge (label-reg: all).

    ``forward`` returns the summed displacement ``(N, D, *S)`` in voxels; sizes must be
    divisible by ``2**len(features)``. :attr:`summands` holds the last forward's summands.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int = 2,
        features: Sequence[int] = (16, 32, 32, 64),
        ddf_levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        feats = [int(f) for f in features]
        depth = len(feats)
        levels = list(range(depth + 1)) if ddf_levels is None else [int(k) for k in ddf_levels]
        if not feats or min(feats) < 1 or not levels or not set(levels) <= set(range(depth + 1)):
            raise ValueError(
                f"LocalNet: need positive features and ddf_levels within 0..{depth}; got "
                f"{tuple(features)}, {ddf_levels}"
            )
        widths = [*feats, 2 * feats[-1]]
        if any(widths[k + 1] % widths[k] for k in range(depth)):
            raise ValueError(
                f"LocalNet: each level's channels must divide the next's (additive "
                f"upsampling sums groups of channels); got {widths}"
            )
        self.ndim, self.depth, self.ddf_levels = ndim, depth, sorted(set(levels))
        self.down = nn.ModuleList()
        prev = int(in_channels)
        for f in feats:
            self.down.append(nn.Sequential(_ConvBN(ndim, prev, f), _Residual(ndim, f)))
            prev = f
        self.pool = (nn.MaxPool2d if ndim == 2 else nn.MaxPool3d)(2)
        self.bridge = _ConvBN(ndim, prev, widths[-1])
        deconv = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
        self.up = nn.ModuleList()
        self.up_res = nn.ModuleList()
        for k in reversed(range(depth)):  # coarse to fine
            self.up.append(deconv(widths[k + 1], widths[k], 2, stride=2, bias=False))
            self.up_res.append(_Residual(ndim, widths[k]))
        self.heads = nn.ModuleDict()
        for k in self.ddf_levels:
            head = conv_nd(ndim)(widths[k], ndim, 3, padding=1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            self.heads[str(k)] = head
        self.summands: dict[int, Tensor] = {}

    @property
    def size_multiple(self) -> int:
        return 2**self.depth

    def forward(self, x: Tensor) -> Tensor:
        k = self.size_multiple
        if x.dim() != self.ndim + 2 or any(s % k for s in x.shape[2:]):
            raise ValueError(
                f"LocalNet: expected (N, C, *S) with {self.ndim} spatial dims divisible by "
                f"{k}; got {tuple(x.shape)}"
            )
        size = tuple(x.shape[2:])
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        y = self.bridge(x)
        features = {self.depth: y}
        for i, (up, res) in enumerate(zip(self.up, self.up_res, strict=True)):
            level = self.depth - 1 - i
            skip = skips[level]
            y = up(y) + _additive_upsample(y, skip.shape[2:], skip.shape[1]) + skip
            y = res(y)
            features[level] = y
        mode = "bilinear" if self.ndim == 2 else "trilinear"
        self.summands = {}
        for level in self.ddf_levels:
            field = self.heads[str(level)](features[level])
            if level:
                field = F.interpolate(field, size=size, mode=mode, align_corners=False)
            self.summands[level] = field
        return sum(self.summands.values())  # type: ignore[return-value]
