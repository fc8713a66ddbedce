"""Deformable registration by a cycle-consistent GAN (Mahapatra et al., ISBI 2018).

The paper's generator takes the reference (fixed) and floating (moving) images and outputs
the registered image and the deformation field; discriminators judge registered images
against real ones, a content loss (NMI + SSIM + VGG features) ties the registered image to the
reference, and CycleGAN's cycle consistency couples a forward and an inverse generator.

* **Generators**: ``G`` (moving → fixed) and ``F`` (fixed → moving), each a U-Net on the pair
  with a displacement head (:class:`~learnreg.nn.unet.UNet`, :class:`~learnreg.nn.blocks.
  FlowHead`, starting at the identity). *Deviation*: the registered image is not a second
  network output but the moving image warped by the predicted displacement, so image and
  field agree exactly and the method returns a well-defined transform
  (:class:`~learnreg.spatial.displacement.DisplacementField`); the paper's generator is a
  residual CNN, here a small U-Net. Registration (:meth:`forward`, prediction) uses ``G``.
* **Discriminators** (:class:`~learnreg.nn.discriminator.Discriminator` on one image):
  ``D_Y`` real fixed images vs ``G``'s registered images, ``D_X`` real moving images vs
  ``F``'s; their loss on the detached registered images is ``"total_discriminator"``,
  parameter group ``discriminator`` (learning rate and update ratio:
  ``optimizer.groups.discriminator``). Fewer conv blocks than the paper's discriminator.
* **Content loss** between registered and target image, in both directions (``G``'s output
  against the fixed image, ``F``'s against the moving one; averaged): ``content`` terms
  (default −NMI + (1 − SSIM), the :mod:`learnreg.losses` terms ``nmi`` and ``ssim``) +
  ``feature_weight`` × a feature distance. *Deviation*: VGG ImageNet weights are not
  available offline; the features are those of a convolutional auto-encoder
  (:class:`~learnreg.nn.features.ConvAutoencoder`) trained concurrently by its own
  optimizer (parameter group ``features``, ``"total_features"``) to reconstruct the real
  images of each batch (fixed and moving, never registered ones), and the distance is the
  channel-normalized squared difference of its per-level features
  (:func:`~learnreg.nn.features.feature_distance`), which never puts gradients into the
  auto-encoder. Measured (150 steps, seed 0, ``feature_weight`` 1; see below): frozen random
  features (``optimizer.groups.features.every`` > ``steps``) Dice 0.382, concurrent 0.383,
  a first stage training the auto-encoder alone (``model`` and ``discriminator`` with
  ``every`` > ``steps``, then ``init``) 0.386: no gain worth a second stage.
* **Cycle consistency** (CycleGAN's L1): ``|x − x ∘ φ_G ∘ φ_F|₁ + |y − y ∘ φ_F ∘ φ_G|₁``,
  the moving image ``x`` registered by ``G`` and back by ``F``, the fixed image ``y`` by
  ``F`` then ``G``, each warped once by the composed displacement
  (:func:`~learnreg.spatial.fields.compose_displacements`, border extension).
* **Generator total** ``"total"`` = content + ``adversarial_weight`` × (``G``'s + ``F``'s
  adversarial terms, :func:`~learnreg.losses.adversarial.generator_loss`) +
  ``cycle_weight`` × cycle + ``regularization`` of both fields.

*Deviations in the weights*, measured on the 2D LPBA40 slices of the tests (atlas S01,
validation Dice on S35–S38, identity 0.351; seed 0 unless stated):

* ``cycle_weight`` 0.1 instead of CycleGAN's λ = 10. The generators start at the identity
  and L1's gradient does not vanish at a small mismatch, so any step of ``G`` that ``F``
  does not mirror at once is penalized: trained 100 steps on SSIM alone, λ = 10 kept both at
  the identity (Dice 0.351), λ = 1 nearly (0.355); λ = 0.3 → 0.391, 0.1 → 0.401, 0 → 0.391.
* ``adversarial_weight`` 0.1 with least squares (``"lsgan"``, CycleGAN's practice;
  ``"bce"``: cross-entropy). The adversarial term did not help Dice at this scale: weight 1
  (bce) → 0.271 with 17 % folded pixels after 100 steps; after 300 steps: none 0.412, bce
  0.1 → 0.403, bce 0.01 → 0.411, lsgan 0.1 → 0.407; early on lsgan is the milder (100 steps
  on SSIM: lsgan 0.1 → 0.385, bce 0.1 → 0.340, none 0.401).
* ``feature_weight`` 0.1: after 150 steps (seeds 0, 1) weight 1 → 0.383, 0.382; 0.1 →
  0.399, 0.390; none → 0.398, 0.397: the learned features add nothing to NMI + SSIM here,
  and a large weight slows registration.
* ``regularization`` ``{"diffusion": 0.1}`` (``{}``: none, as the paper's objective of
  adversarial, content and cycle terms only): after 150 steps
  0.28 % vs 0.71 % folded pixels, Dice 0.383 vs 0.382.

CPU scaling: the paper registered 2D retinal and cardiac images at full resolution; the
defaults here are small U-Nets, discriminators and auto-encoder, trained on whole images at
reduced resolution (the tests: 80×96 slices at 2 mm, smaller networks still, NMI on 2048
random voxels per call). Works in 2D and 3D; grid sizes must be multiples of
:attr:`size_multiple`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.losses.adversarial import ADVERSARIAL_KINDS, discriminator_loss, generator_loss
from learnreg.losses.functional import l1
from learnreg.losses.terms import LossSpec, LossTerms
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.blocks import FlowHead
from learnreg.nn.discriminator import Discriminator
from learnreg.nn.features import ConvAutoencoder, feature_distance
from learnreg.nn.unet import UNet
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.fields import compose_displacements
from learnreg.spatial.sampling import warp

__all__ = ["DisplacementGenerator", "MahapatraGAN"]

_OWN_TERMS = (
    "content",
    "features",
    "adversarial",
    "cycle",
    "discriminator",
    "reconstruction",
    "total",
)


class DisplacementGenerator(nn.Module):
    """A generator of the cycle: U-Net on ``(moving, fixed)`` → displacement ``(N, D, *S)``
    (voxels, fixed → moving; the identity at initialization)."""

    def __init__(
        self,
        ndim: int,
        enc_features: Sequence[int],
        dec_features: Sequence[int],
        norm: str | None = None,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        self.unet = UNet(ndim, 2, enc_features, dec_features, norm=norm, coord_conv=coord_conv)
        self.flow = FlowHead(ndim, self.unet.out_channels)

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        return self.flow(self.unet(torch.cat([moving, fixed], 1)))


@register_method(
    "mahapatra-gan",
    year=2018,
    ndim="2D/3D",
    transform="dense displacement",
    loss="adversarial + content (NMI + SSIM + learned features) + cycle consistency",
    supervision="unsupervised (adversarial)",
    reference="Mahapatra et al., ISBI 2018",
    aliases=("mahapatra2018", "cycle-gan-registration"),
)
class MahapatraGAN(RegistrationMethod):
    """Mahapatra et al.'s cycle-consistent GAN registration, with a learned feature loss.

    Args:
        ndim: 2 or 3.
        enc_features, dec_features, norm, coord_conv: each generator's U-Net.
        content: the image terms of the content loss, a :mod:`learnreg.losses.terms` spec of
            similarity losses (default ``{"nmi": 1.0, "ssim": 1.0}``, the paper's NMI and
            SSIM; the ``nmi`` term is −NMI, in [−2, −1]).
        feature_weight: weight of the auto-encoder feature distance (the paper's VGG term);
            0 leaves it out (no auto-encoder, no ``features`` group).
        feature_features: channels of the auto-encoder's levels.
        adversarial_weight: weight of each generator's adversarial term (> 0).
        adversarial: ``"lsgan"`` (least squares) or ``"bce"`` (cross-entropy).
        cycle_weight: weight λ of the cycle-consistency L1 (>= 0).
        regularization: smoothness of both predicted fields, named weighted regularizers
            (default ``{"diffusion": 0.1}``; ``{}``: none, as the paper).
        discriminator_features, discriminator_norm, discriminator_output: the two
            discriminators' conv blocks and head (``"global"`` or ``"patch"``).
    """

    group_modules: ClassVar[dict[str, tuple[str, ...]]] = {
        "discriminator": ("discriminator_fixed", "discriminator_moving"),
        "features": ("features",),
    }

    def __init__(
        self,
        ndim: int = 3,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        content: LossSpec = None,
        feature_weight: float = 0.1,
        feature_features: Sequence[int] = (16, 32, 64),
        adversarial_weight: float = 0.1,
        adversarial: str = "lsgan",
        cycle_weight: float = 0.1,
        regularization: LossSpec = None,
        discriminator_features: Sequence[int] = (16, 32, 64, 64),
        discriminator_norm: str | None = None,
        discriminator_output: str = "global",
        norm: str | None = None,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        check_option("ndim", ndim, (2, 3))
        check_option("adversarial", adversarial, ADVERSARIAL_KINDS)
        weights = {
            "feature_weight": feature_weight,
            "adversarial_weight": adversarial_weight,
            "cycle_weight": cycle_weight,
        }
        for key, w in weights.items():
            if not math.isfinite(float(w)) or w < 0 or (key == "adversarial_weight" and w == 0):
                need = "> 0" if key == "adversarial_weight" else ">= 0"
                raise ValueError(f"{self.name}: {key} must be finite and {need}, got {w}")
        if content is None:
            content = {"nmi": 1.0, "ssim": 1.0}
            self.resolve(content=content)
        if regularization is None:
            regularization = {"diffusion": 0.1}
            self.resolve(regularization=regularization)
        self.content_terms = LossTerms(content, "similarity", role="content")
        self.regularization_terms = LossTerms(regularization, "regularizer", role="regularization")
        names = [*self.content_terms.names, *self.regularization_terms.names]
        clash = sorted(set(names) & set(_OWN_TERMS))
        if clash:
            raise ValueError(
                f"{self.name}: term name(s) {clash} are taken by the method's own terms "
                f"{_OWN_TERMS}; name them e.g. {{my_{clash[0]}: {{loss: ...}}}}"
            )
        if not len(self.content_terms) and not feature_weight:
            raise ValueError(
                f"{self.name}: the content loss is empty (no content terms and "
                "feature_weight 0); the generators need it to register"
            )
        self.ndim = ndim
        self.feature_weight = float(feature_weight)
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial = adversarial
        self.cycle_weight = float(cycle_weight)
        self.generator = DisplacementGenerator(ndim, enc_features, dec_features, norm, coord_conv)
        self.inverse_generator = DisplacementGenerator(
            ndim, enc_features, dec_features, norm, coord_conv
        )
        d_args = (discriminator_features, discriminator_norm, discriminator_output)
        self.discriminator_fixed = Discriminator(ndim, 1, *d_args)
        self.discriminator_moving = Discriminator(ndim, 1, *d_args)
        self.features = ConvAutoencoder(ndim, 1, feature_features) if feature_weight else None
        if self.features is None:  # no feature network, no "features" parameter group
            self.group_modules = {"discriminator": self.group_modules["discriminator"]}

    @property
    def size_multiple(self) -> int:
        k = self.generator.unet.size_multiple
        return k if self.features is None else max(k, self.features.size_multiple)

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        if fixed.dim() != self.ndim + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"{self.name}: fixed and moving must both be (N, 1, *S) with {self.ndim} "
                f"spatial dims; got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        """``G``'s registration of ``moving`` to ``fixed``."""
        self.check_pair(fixed, moving)
        grid = unit_grid(fixed) if grid is None else grid
        field = self.generator(fixed, moving)
        return MethodOutput(DisplacementField(grid, field), grid, moving, {"field": field})

    def content_loss(self, target: Tensor, registered: Tensor) -> dict[str, Tensor]:
        """The content terms of ``registered`` against ``target`` by name (``"features"``:
        the feature distance), and their weighted sum ``"content"``."""
        out: dict[str, Tensor] = {}
        total = registered.new_zeros(())
        if len(self.content_terms):
            terms = self.content_terms(target, registered)
            total = total + terms.pop("total")
            out.update(terms)
        if self.features is not None:
            out["features"] = feature_distance(self.features.encoder, target, registered)
            total = total + self.feature_weight * out["features"]
        out["content"] = total
        return out

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        fixed, moving = batch.fixed, batch.moving
        u_g = output.displacement
        registered = output.warped
        u_f = self.inverse_generator(moving, fixed)  # registers the fixed image to the moving
        registered_fixed = warp(fixed, u_f)
        forward, backward = (
            self.content_loss(fixed, registered),
            self.content_loss(moving, registered_fixed),
        )
        out = {k: 0.5 * (forward[k] + backward[k]) for k in forward}
        adv_g = generator_loss(self.discriminator_fixed(registered), self.adversarial)
        adv_f = generator_loss(self.discriminator_moving(registered_fixed), self.adversarial)
        out["adversarial"] = adv_g + adv_f
        cycle_x = warp(moving, compose_displacements(u_g, u_f))  # x ∘ φ_G ∘ φ_F
        cycle_y = warp(fixed, compose_displacements(u_f, u_g))  # y ∘ φ_F ∘ φ_G
        out["cycle"] = l1(moving, cycle_x) + l1(fixed, cycle_y)
        total = out["content"] + self.adversarial_weight * out["adversarial"]
        total = total + self.cycle_weight * out["cycle"]
        reg = self.regularization_terms
        if len(reg):
            rg, rf = reg(u_g), reg(u_f)
            for name in reg.names:
                out[name] = rg[name] + rf[name]
            total = total + rg["total"] + rf["total"]
        out["total"] = total
        d_y = discriminator_loss(
            self.discriminator_fixed(fixed),
            self.discriminator_fixed(registered.detach()),
            self.adversarial,
        )
        d_x = discriminator_loss(
            self.discriminator_moving(moving),
            self.discriminator_moving(registered_fixed.detach()),
            self.adversarial,
        )
        out["discriminator"] = d_y + d_x
        out["total_discriminator"] = out["discriminator"]
        if self.features is not None:
            out["reconstruction"] = self.features.reconstruction_loss(torch.cat([fixed, moving]))
            out["total_features"] = out["reconstruction"]
        return out
