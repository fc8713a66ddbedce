"""A tiny stand-in registration method implementing exactly the method interface."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod
from learnreg.spatial.sampling import warp


class StandIn(RegistrationMethod):
    """Strided conv net predicting a coarse displacement, upsampled; loss MSE + diffusion."""

    name = "standin"

    def __init__(self, ndim: int = 2, features: int = 8, reg_weight: float = 0.01) -> None:
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.ndim = ndim
        self.reg_weight = reg_weight
        self.net = nn.Sequential(
            conv(2, features, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.1),
            conv(features, features, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            conv(features, ndim, 3, padding=1),
        )
        nn.init.normal_(self.net[-1].weight, std=1e-3)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> MethodOutput:
        coarse = self.net(torch.cat([fixed, moving], 1))
        mode = "bilinear" if self.ndim == 2 else "trilinear"
        disp = F.interpolate(coarse, size=fixed.shape[2:], mode=mode, align_corners=True) * 4
        return MethodOutput(disp, warp(moving, disp))

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, torch.Tensor]:
        sim = F.mse_loss(output.warped, batch.fixed)
        u = output.displacement
        reg = sum((u.diff(dim=d + 2) ** 2).mean() for d in range(self.ndim))
        return {"total": sim + self.reg_weight * reg, "mse": sim, "diffusion": reg}
