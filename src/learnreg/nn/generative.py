"""A fully connected generative network of dense displacement fields (Sheikhjafari 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["FieldGenerator"]


class FieldGenerator(nn.Module):
    """``z (N, latent)`` → displacement ``(N, D, *shape)`` through fully connected layers.

    Hidden layers of ``hidden`` units with ``tanh`` (a smooth generator: the field's
    smoothness comes from the network, not from a regularizer); the output layer starts at
    zero weights and bias, so the first field is the identity whatever ``z``.
    """

    def __init__(self, shape: Sequence[int], latent: int = 16, hidden: Sequence[int] = (64, 128)):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if not 1 <= len(self.shape) <= 3 or latent < 1 or not hidden:
            raise ValueError(
                f"FieldGenerator: need a 1-3D shape, latent >= 1 and hidden layers; got "
                f"{self.shape}, {latent}, {tuple(hidden)}"
            )
        layers: list[nn.Module] = []
        cin = int(latent)
        for h in hidden:
            layers += [nn.Linear(cin, int(h)), nn.Tanh()]
            cin = int(h)
        out = nn.Linear(cin, len(self.shape) * int(torch.tensor(self.shape).prod()))
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[0], len(self.shape), *self.shape)
