"""Building blocks shared by registration networks: conv blocks, CoordConv, flow heads.

All blocks work in 2D or 3D (``ndim``) on tensors ``(N, C, *S)`` in array index order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnreg.core.options import check_option

__all__ = [
    "NORMS",
    "ACTIVATIONS",
    "conv_nd",
    "ConvBlock",
    "AddCoords",
    "CoordConv",
    "FlowHead",
    "InverseNetwork",
]

NORMS = (None, "batch", "instance", "group")
# FlowHead computes its conv tap by tap along axis 0 when k · out_channels fits one oneDNN
# output block
_TAPS_MAX_CHANNELS = 16


def _check_ndim(ndim: int) -> int:
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    return ndim


def conv_nd(ndim: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return nn.Conv2d if _check_ndim(ndim) == 2 else nn.Conv3d


def _norm(kind: str | None, ndim: int, channels: int) -> nn.Module:
    check_option("norm", kind, NORMS)
    if kind is None:
        return nn.Identity()
    if kind == "batch":
        return (nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if ndim == 2 else nn.InstanceNorm3d)(channels, affine=True)
    return nn.GroupNorm(min(8, channels), channels)


ACTIVATIONS = ("leaky_relu", "elu")


class ConvBlock(nn.Module):
    """``conv (kernel 3, padding same) → [norm] → LeakyReLU(0.2)``, as VoxelMorph's conv block.

    ``stride=2`` halves every spatial size (even sizes). ``norm``: None, ``"batch"``,
    ``"instance"`` or ``"group"`` (the conv then has no bias). ``activation``:
    ``"leaky_relu"`` (slope ``negative_slope``; 0 is the plain ReLU) or ``"elu"`` (DLIR's).
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_size: int = 3,
        norm: str | None = None,
        negative_slope: float = 0.2,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        check_option("activation", activation, ACTIVATIONS)
        self.conv = conv_nd(ndim)(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=norm is None,
        )
        self.norm = _norm(norm, ndim, out_channels)
        self.act: nn.Module = (
            nn.LeakyReLU(negative_slope, inplace=True)
            if activation == "leaky_relu"
            else nn.ELU(inplace=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class AddCoords(nn.Module):
    """Append ``ndim`` channels of normalized coordinates in [-1, 1] (CoordConv, Liu et al. 2018).

    Channel ``d`` holds the coordinate along index axis ``d`` (array index order, not
    grid_sample's reversed order): −1 at the first voxel centre, +1 at the last
    (``align_corners=True`` convention; 0 on an axis of size 1).
    """

    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.ndim = _check_ndim(ndim)

    def coords(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """``(1, D, *shape)`` coordinate channels."""
        axes = [
            torch.linspace(-1, 1, n, dtype=dtype, device=device)
            if n > 1
            else torch.zeros(1, dtype=dtype, device=device)
            for n in shape
        ]
        return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.ndim + 2:
            raise ValueError(
                f"AddCoords: expected (N, C, *S) with {self.ndim} spatial dims, "
                f"got {tuple(x.shape)}"
            )
        c = self.coords(tuple(x.shape[2:]), x.dtype, x.device)
        return torch.cat([x, c.expand(x.shape[0], *c.shape[1:])], 1)


class CoordConv(nn.Module):
    """:class:`AddCoords` followed by a :class:`ConvBlock` on ``in_channels + ndim`` channels.

    ``forward(x, coords)``: ``coords`` ``(N, D, *S)`` replaces the tensor's own coordinates,
    for a network whose input is a crop of a larger image (a patch network: the position of
    each output in the whole image)."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, **block_options) -> None:
        super().__init__()
        self.add_coords = AddCoords(ndim)
        self.block = ConvBlock(ndim, in_channels + ndim, out_channels, **block_options)

    def forward(self, x: Tensor, coords: Tensor | None = None) -> Tensor:
        if coords is None:
            return self.block(self.add_coords(x))
        if coords.shape != (x.shape[0], self.add_coords.ndim, *x.shape[2:]):
            raise ValueError(
                f"CoordConv: coords must be {(x.shape[0], self.add_coords.ndim, *x.shape[2:])}, "
                f"got {tuple(coords.shape)}"
            )
        return self.block(torch.cat([x, coords.to(x)], 1))


class FlowHead(nn.Module):
    """Conv (kernel 3) to a dense field of ``out_channels`` (default ``ndim``) channels.

    Weights start ~ Normal(0, ``std``) and the bias at ``bias`` (VoxelMorph: std 1e-5, bias 0,
    so the first prediction is the identity; its log-variance head uses std 1e-10, bias −10).
    The output is contiguous (channels-first) whatever the input's memory format. On CPU the
    conv is evaluated tap by tap along axis 0 (:meth:`_conv_by_axis0_taps`, about 2x faster
    for 3 output channels); parameters and results are those of the plain conv.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int | None = None,
        std: float = 1e-5,
        bias: float = 0.0,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        out = ndim if out_channels is None else out_channels
        self.conv = conv_nd(ndim)(in_channels, out, kernel_size, padding=kernel_size // 2)
        nn.init.normal_(self.conv.weight, 0.0, std)
        nn.init.constant_(self.conv.bias, bias)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        k = conv.kernel_size[0]
        if x.device.type != "cpu" or k == 1 or k * conv.out_channels > _TAPS_MAX_CHANNELS:
            # a channels-last input (the UNet's) gives a channels-last conv output; the field
            # is returned in the contiguous layout the spatial code expects
            return conv(x).contiguous()
        return self._conv_by_axis0_taps(x)

    def _conv_by_axis0_taps(self, x: Tensor) -> Tensor:
        """The same convolution, computed as one conv of kernel 1 along axis 0 with
        ``k · out_channels`` outputs (one group per tap ``j`` of axis 0) whose groups are
        summed shifted by ``j − k//2`` along axis 0, plus the bias.

        oneDNN pads a conv's output channels to 16 on CPU, so a 3-channel 3×3×3 head costs
        as much as a 16-channel one; the ``k · out`` = 9 channels of the tap conv fit the same
        16 and need a third of the work. Same products and sums (float rounding aside),
        same weights (a view of ``conv.weight``), contiguous output.
        """
        conv = self.conv
        w = conv.weight  # (C_out, C_in, k, *rest)
        c, k, r = w.shape[0], w.shape[2], w.shape[2] // 2
        taps = w.movedim(2, 0).reshape(k * c, w.shape[1], 1, *w.shape[3:])
        fn = F.conv2d if x.dim() == 4 else F.conv3d
        y = fn(x, taps, None, padding=(0, *conv.padding[1:]))  # (N, k·C_out, *S)
        n, size = x.shape[0], x.shape[2]
        out = torch.empty((n, c, *x.shape[2:]), dtype=y.dtype, device=y.device)
        out.copy_(y[:, r * c : (r + 1) * c])
        out += conv.bias.view(1, c, *([1] * (x.dim() - 2)))
        for j in range(k):
            s = j - r  # out[z] += tap_j[z + s]
            if s == 0 or abs(s) >= size:
                continue
            tap = y[:, j * c : (j + 1) * c]
            if s > 0:
                out[:, :, : size - s] += tap[:, :, s:]
            else:
                out[:, :, -s:] += tap[:, :, : size + s]
        return out


class InverseNetwork(nn.Module):
    """A displacement ``(N, D, *S)`` → an estimate of its inverse, same shape: convolutions of
    ``features`` channels and a field head, plus the first-order inverse ``−u`` as a skip
    (so it starts as the negation and learns the correction)."""

    def __init__(self, ndim: int, features: Sequence[int] = (16, 16, 16)) -> None:
        super().__init__()
        layers, cin = [], ndim
        for f in features:
            layers.append(ConvBlock(ndim, cin, int(f)))
            cin = int(f)
        self.body = nn.Sequential(*layers)
        self.head = FlowHead(ndim, cin)

    def forward(self, displacement: Tensor) -> Tensor:
        return -displacement + self.head(self.body(displacement))
