"""The VoxelMorph U-Net, for 2D and 3D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnreg.nn.blocks import ConvBlock, CoordConv

__all__ = ["UNet"]


def _channels_last(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


class UNet(nn.Module):
    """U-Net of VoxelMorph (Balakrishnan et al. 2019, "vm2" features by default).

    Encoder: ``depth = len(enc_features)`` conv blocks of stride 2 (each halves the size).
    Decoder: the first ``depth`` entries of ``dec_features`` are one conv block each, followed
    by nearest ×2 upsampling and concatenation with the encoder activation of that size (the
    last one with the input itself); the remaining entries are conv blocks at full
    resolution. The output has :attr:`out_channels` channels at the input's size, which must
    be divisible by ``2**depth``. ``coord_conv=True`` appends normalized coordinate channels
    to the input of the first conv (CoordConv).

    On CPU the activations, and so the output, are in channels-last memory format (same
    shape and values; call ``.contiguous()`` before ``.view`` on the output).
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int = 2,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        norm: str | None = None,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        enc, dec = [int(f) for f in enc_features], [int(f) for f in dec_features]
        if not enc or any(f < 1 for f in enc + dec):
            raise ValueError(f"UNet: enc_features must be non-empty and positive, got {enc}")
        if len(dec) < len(enc):
            raise ValueError(
                f"UNet: dec_features needs at least len(enc_features) = {len(enc)} entries "
                f"(one per upsampling level), got {dec}"
            )
        self.ndim, self.in_channels, self.depth = ndim, in_channels, len(enc)
        self.encoder = nn.ModuleList()
        prev = in_channels
        for i, f in enumerate(enc):
            if i == 0 and coord_conv:
                self.encoder.append(CoordConv(ndim, prev, f, stride=2, norm=norm))
            else:
                self.encoder.append(ConvBlock(ndim, prev, f, stride=2, norm=norm))
            prev = f
        skips = [in_channels, *enc[:-1]][::-1]  # channels concatenated after each upsampling
        self.decoder = nn.ModuleList()
        for i, f in enumerate(dec):
            self.decoder.append(ConvBlock(ndim, prev, f, norm=norm))
            prev = f + skips[i] if i < self.depth else f
        self.out_channels = prev

    @property
    def size_multiple(self) -> int:
        """Input sizes must be multiples of ``2**depth``."""
        return 2**self.depth

    def check_input(self, x: Tensor) -> None:
        """Raise a ValueError unless ``x`` is ``(N, in_channels, *S)`` with S divisible."""
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet: expected input (N, {self.in_channels}, *S) with {self.ndim} spatial "
                f"dims, got {tuple(x.shape)}"
            )
        k = self.size_multiple
        bad = [s for s in x.shape[2:] if s % k]
        if bad:
            raise ValueError(
                f"UNet: every spatial size must be divisible by 2**depth = {k} "
                f"(depth {self.depth}); got {tuple(x.shape[2:])}. Pad or resample the images "
                f"to e.g. {tuple(-(-s // k) * k for s in x.shape[2:])}."
            )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        # Channels-last activations on CPU: oneDNN's fastest convolution layout there (about
        # 2x for the full-resolution convs with few channels, forward and backward). Small
        # convs that PyTorch runs on its own kernels return channels-first tensors; those are
        # converted back (cheap at their low resolution). Same values either way.
        fmt = _channels_last(self.ndim) if x.device.type == "cpu" else torch.contiguous_format
        history = [x.contiguous(memory_format=fmt)]
        for block in self.encoder:
            history.append(block(history[-1]).contiguous(memory_format=fmt))
        y = history.pop()
        for i, block in enumerate(self.decoder):
            y = block(y).contiguous(memory_format=fmt)
            if i < self.depth:
                y = F.interpolate(y, scale_factor=2, mode="nearest")
                y = torch.cat([y, history.pop()], 1)
        return y
