"""ICNet: inverse-consistent unsupervised registration (Zhang, arXiv:1809.03443, 2018).

Two parallel U-Nets predict, for a pair, the forward displacement (warping the moving image
onto the fixed one) and the inverse displacement (warping the fixed image onto the moving
one); a small fully convolutional *inverse network* maps a displacement to an estimate of its
inverse. Training is unsupervised, the paper's four terms:

* intensity: mean squared difference in both directions, ``|fixed − moving∘φ|² +
  |moving − fixed∘ψ|²`` — both images deformed toward each other;
* inverse consistency: the inverse network's inverse of each field equals the other field,
  ``|inv(u_φ) − u_ψ|² + |inv(u_ψ) − u_φ|²`` (voxels²);
* anti-folding: :func:`~learnreg.losses.functional.folding_penalty` of both fields
  (``relu(−det J)``);
* smoothness: diffusion (squared gradient) of both fields.

Prediction uses the forward U-Net only; the transform is its displacement
(:class:`~learnreg.spatial.displacement.DisplacementField`, fixed → moving) and the inverse
U-Net's displacement is in ``extras["inverse_displacement"]``. Scaled for CPU: the U-Nets
are :class:`~learnreg.nn.unet.UNet` (VoxelMorph's encoder–decoder, configurable channels),
not the paper's channel counts. The weights (inverse consistency 0.01, anti-folding 1,
smoothness 0.003) were chosen on the 2D brain slices of the tests (300 steps, seeds 0–2):
Dice +0.03 to +0.06 over the identity on unseen pairs, no folds. Measured there, the
inverse-consistency term — through the learned inverse network — does not make the two
U-Nets' fields inverse to each other: composing them leaves 0.6–1.1× the mean displacement
on an unseen pair; with weight 0.1 they are (0.15×) but the registration stops (+0.007 Dice).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.losses import functional as LF
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.blocks import FlowHead, InverseNetwork
from learnreg.nn.unet import UNet
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.sampling import warp

__all__ = ["ICNet"]


@register_method(
    "icnet",
    year=2018,
    ndim="3D (2D by the same layers)",
    transform="dense displacement (forward and inverse)",
    loss="MSE both ways + inverse consistency + anti-folding + smoothness",
    supervision="unsupervised",
    reference="Zhang, arXiv:1809.03443 (2018)",
    aliases=("zhang2018", "inverse-consistent"),
)
class ICNet(RegistrationMethod):
    """ICNet (module docstring).

    Args:
        ndim: 3 (the paper) or 2.
        enc_features, dec_features, norm, coord_conv: each of the two U-Nets.
        inverse_features: channels of the inverse network's convolutions.
        inverse_consistency, anti_folding, smoothness: weights of the terms (the intensity
            term has weight 1 per direction).
    """

    def __init__(
        self,
        ndim: int = 3,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        inverse_features: Sequence[int] = (16, 16, 16),
        inverse_consistency: float = 0.01,
        anti_folding: float = 1.0,
        smoothness: float = 0.003,
        norm: str | None = None,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        check_option("ndim", ndim, (2, 3))
        weights = {
            "inverse_consistency": inverse_consistency,
            "anti_folding": anti_folding,
            "smoothness": smoothness,
        }
        bad = {k: w for k, w in weights.items() if w < 0}
        if bad:
            raise ValueError(f"icnet: weights must be >= 0, got {bad}")
        self.ndim = ndim
        self.weights = {k: float(w) for k, w in weights.items()}
        self.forward_net = UNet(ndim, 2, enc_features, dec_features, norm, coord_conv)
        self.inverse_net = UNet(ndim, 2, enc_features, dec_features, norm, coord_conv)
        self.forward_head = FlowHead(ndim, self.forward_net.out_channels)
        self.inverse_head = FlowHead(ndim, self.inverse_net.out_channels)
        self.invert = InverseNetwork(ndim, inverse_features)

    @property
    def size_multiple(self) -> int:
        return self.forward_net.size_multiple

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        if fixed.dim() != self.ndim + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"icnet: fixed and moving must both be (N, 1, *S) with {self.ndim} spatial "
                f"dims; got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        grid = unit_grid(fixed) if grid is None else grid
        u = self.forward_head(self.forward_net(torch.cat([moving, fixed], 1)))
        extras = {"field": u}
        if self.training:  # the inverse U-Net is trained with the forward one, used by loss
            w = self.inverse_head(self.inverse_net(torch.cat([fixed, moving], 1)))
            extras["inverse_displacement"] = w
            extras["warped_fixed"] = warp(fixed, w)
        return MethodOutput(DisplacementField(grid, u), grid, moving, extras)

    def inverse_displacement(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """The inverse U-Net's displacement of a pair ``(N, D, *S)`` (warps ``fixed`` onto
        ``moving``)."""
        return self.inverse_head(self.inverse_net(torch.cat([fixed, moving], 1)))

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        u = output.extras["field"]
        if "inverse_displacement" in output.extras:
            w, warped_fixed = output.extras["inverse_displacement"], output.extras["warped_fixed"]
        else:
            w = self.inverse_displacement(batch.fixed, batch.moving)
            warped_fixed = warp(batch.fixed, w)
        terms = {
            "intensity": LF.mse(batch.fixed, output.warped) + LF.mse(batch.moving, warped_fixed),
            "inverse_consistency": ((self.invert(u) - w) ** 2).sum(1).mean()
            + ((self.invert(w) - u) ** 2).sum(1).mean(),
            "anti_folding": LF.folding_penalty(u) + LF.folding_penalty(w),
            "smoothness": LF.diffusion(u) + LF.diffusion(w),
        }
        total = terms["intensity"] + sum(self.weights[k] * terms[k] for k in self.weights)
        return {**terms, "total": total}
