"""Interest-point detectors: one small feed-forward network per landmark, scoring the
feature vector of a voxel ("is this voxel the landmark?").

:class:`DetectorBank` holds K independent multilayer perceptrons of one architecture and
evaluates them together (batched matrix products, each detector on its own candidates). Used
by :class:`~learnreg.methods.sergeev.Sergeev2012` on the patches of
:func:`learnreg.spatial.point_patches.patch_features`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["DetectorBank"]

_ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu}


class DetectorBank(nn.Module):
    """K independent MLPs ``in_features → hidden… → 1`` (a logit), one per landmark.

    Args:
        detectors: K, the number of networks.
        in_features: length of the feature vector each scores.
        hidden: hidden layer widths (Sergeev et al.: two layers of 60 units).
        activation: ``"tanh"`` (default), ``"sigmoid"`` or ``"relu"`` between layers.

    ``forward(x)``: ``x`` ``(K, M, in_features)`` — M candidates for each detector — to
    ``(K, M)`` logits; detector ``k`` sees only ``x[k]``.
    """

    def __init__(
        self,
        detectors: int,
        in_features: int,
        hidden: Sequence[int] = (60, 60),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if detectors < 1 or in_features < 1 or any(int(h) < 1 for h in hidden):
            raise ValueError(
                f"DetectorBank: detectors, in_features and hidden widths must be >= 1, got "
                f"{detectors}, {in_features}, {list(hidden)}"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(f"DetectorBank: activation must be one of {sorted(_ACTIVATIONS)}")
        self.detectors, self.in_features = int(detectors), int(in_features)
        self.activation = activation
        widths = [self.in_features, *(int(h) for h in hidden), 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(widths):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialization
            self.weights.append(nn.Parameter(torch.empty(detectors, fan_in, fan_out)))
            self.biases.append(nn.Parameter(torch.empty(detectors, 1, fan_out)))
            nn.init.uniform_(self.weights[-1], -bound, bound)
            nn.init.uniform_(self.biases[-1], -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[0] != self.detectors or x.shape[2] != self.in_features:
            raise ValueError(
                f"DetectorBank: expected ({self.detectors}, M, {self.in_features}) features, "
                f"got {tuple(x.shape)}"
            )
        act = _ACTIVATIONS[self.activation]
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < n - 1:
                x = act(x)
        return x[..., 0]
