"""Convolutional discriminators of adversarial registration (2D and 3D).

:class:`Discriminator` maps ``(N, C, *S)`` to logits: one per input (``output="global"``:
strided conv blocks, global average pooling, a linear layer), or one per receptive field
(``output="patch"``, PatchGAN: the conv blocks, then a 1-channel conv). Inputs are whatever a
method judges: an image pair stacked as channels (Fan 2018: aligned or not?), a dense
displacement field (Hu 2018: simulated or predicted?), a single image (Mahapatra 2018: real or
registered?). Logits, not probabilities: the losses of :mod:`learnreg.losses.adversarial` apply
the sigmoid in a numerically stable way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from learnreg.core.options import check_option
from learnreg.nn.blocks import ConvBlock, conv_nd

__all__ = ["Discriminator", "OUTPUTS"]

OUTPUTS = ("global", "patch")


class Discriminator(nn.Module):
    """``len(features)`` conv blocks (kernel 3, LeakyReLU 0.2), each halving the size
    (stride 2; sizes are rounded up), then the logit head.

    Args:
        ndim: 2 or 3.
        in_channels: channels of what is judged (2 for an image pair, ``ndim`` for a field).
        features: channels of the conv blocks.
        norm: normalization of every block but the first (None, ``"batch"``, ``"instance"``,
            ``"group"``); the first has none, as DCGAN and PatchGAN.
        output: ``"global"`` (logits ``(N,)``) or ``"patch"`` (``(N, 1, *S')``).
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        features: Sequence[int] = (16, 32, 64, 64),
        norm: str | None = None,
        output: str = "global",
    ) -> None:
        super().__init__()
        check_option("output", output, OUTPUTS)
        feats = [int(f) for f in features]
        if not feats or min(feats) < 1 or in_channels < 1:
            raise ValueError(
                f"Discriminator: need in_channels >= 1 and at least one positive feature "
                f"count; got {in_channels}, {tuple(features)}"
            )
        blocks, cin = [], int(in_channels)
        for i, f in enumerate(feats):
            blocks.append(ConvBlock(ndim, cin, f, stride=2, norm=None if i == 0 else norm))
            cin = f
        self.blocks = nn.Sequential(*blocks)
        self.output = output
        self.head: nn.Module = (
            nn.Linear(cin, 1) if output == "global" else conv_nd(ndim)(cin, 1, 3, padding=1)
        )
        self.ndim, self.in_channels = ndim, int(in_channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Discriminator: expected (N, {self.in_channels}, *S) with {self.ndim} spatial "
                f"dims, got {tuple(x.shape)}"
            )
        h = self.blocks(x)
        if self.output == "patch":
            return self.head(h)
        return self.head(torch.flatten(h, 2).mean(-1)).squeeze(1)
