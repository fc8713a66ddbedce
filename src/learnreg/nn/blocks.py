"""Building blocks shared by registration networks: conv blocks, CoordConv, flow heads.

All blocks work in 2D or 3D (``ndim``) on tensors ``(N, C, *S)`` in array index order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["NORMS", "conv_nd", "ConvBlock", "AddCoords", "CoordConv", "FlowHead"]

NORMS = (None, "batch", "instance", "group")


def _check_ndim(ndim: int) -> int:
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    return ndim


def conv_nd(ndim: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return nn.Conv2d if _check_ndim(ndim) == 2 else nn.Conv3d


def _norm(kind: str | None, ndim: int, channels: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
    if kind is None:
        return nn.Identity()
    if kind == "batch":
        return (nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if ndim == 2 else nn.InstanceNorm3d)(channels, affine=True)
    return nn.GroupNorm(min(8, channels), channels)


class ConvBlock(nn.Module):
    """``conv (kernel 3, padding same) → [norm] → LeakyReLU(0.2)``, as VoxelMorph's conv block.

    ``stride=2`` halves every spatial size (even sizes). ``norm``: None, ``"batch"``,
    ``"instance"`` or ``"group"`` (the conv then has no bias).
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
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = conv_nd(ndim)(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=norm is None,
        )
        self.norm = _norm(norm, ndim, out_channels)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)

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
    """:class:`AddCoords` followed by a :class:`ConvBlock` on ``in_channels + ndim`` channels."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, **block_options) -> None:
        super().__init__()
        self.add_coords = AddCoords(ndim)
        self.block = ConvBlock(ndim, in_channels + ndim, out_channels, **block_options)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.add_coords(x))


class FlowHead(nn.Module):
    """Conv (kernel 3) to a dense field of ``out_channels`` (default ``ndim``) channels.

    Weights start ~ Normal(0, ``std``) and the bias at ``bias`` (VoxelMorph: std 1e-5, bias 0,
    so the first prediction is the identity; its log-variance head uses std 1e-10, bias −10).
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
        return self.conv(x)
