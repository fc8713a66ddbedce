"""Adversarial similarity network (Fan et al., MICCAI 2018 / MedIA 2019).

A registration network learns without a hand-made similarity: a **discriminator** judges
whether an image pair is aligned, and the registration network (the generator) is trained to
make its warped pairs look aligned to it, plus an explicit smoothness regularizer.

* **Generator**: a U-Net on the (moving, fixed) pair with a displacement head (the paper's
  U-Net-like registration network; :class:`~learnreg.methods.voxelmorph.VoxelMorph`'s network,
  so ``integration_steps > 0`` makes it diffeomorphic, an option the paper did not have). A
  spatial transformer warps the moving image.
* **Discriminator** (:class:`~learnreg.nn.discriminator.Discriminator`): strided conv blocks
  on the pair stacked as two channels → logits of "aligned". The paper's discriminator
  judges one 64³ patch pair at a time; on the whole images learnreg trains on, the same
  local judgement is a patch output (one logit per receptive field of 63 voxels, averaged by
  the loss). Measured on LPBA40 slices (seed 0, 200 steps, the recipe below): validation
  Dice 0.351 → 0.405 with patch output, 0.392 with one logit per image.
* **Positive (aligned) pairs**: the fixed image and a slightly perturbed copy of it. As in the
  paper's mono-modal set-up the copy is blended with the warped moving image,
  ``α · fixed + (1 − α) · warped`` (``positive_blend`` α; the warped image detached):
  identical up to a small perturbation, but not so trivially identical that the
  discriminator wins by spotting an exact copy. Every pair the discriminator sees in training
  gets instance noise of σ ``positive_noise`` (positives and negatives alike; noise on the
  positives alone was measured to be the tell it learned, and Dice fell).
  **Negative pairs**: ``(fixed, warped)``, the generator's output.
* **Losses** (:mod:`learnreg.losses.adversarial`): the discriminator's cross-entropy on
  positives and (detached) negatives, ``"total_discriminator"``, trained by its own
  optimizer (parameter group ``discriminator``; its learning rate and the update ratio are
  ``optimizer.groups.discriminator`` / ``optimizer.groups.model.every`` in the training
  config); the generator's ``−log D(fixed, warped)`` + ``regularization`` (diffusion of the
  displacement by default), ``"total"``. No labels in training.

Recipe (the tests' and ``benchmarks/adversarial_lpba40.py``'s): Adam, generator lr 1e-3,
discriminator lr 1e-4 (``optimizer.groups.discriminator.lr``; with the generator's lr the
discriminator won within 100 steps and Dice fell below the identity's), one discriminator
update per two generator updates (``optimizer.groups.discriminator.every: 2``; on LPBA40 at
4 mm, 600 steps: Dice 0.614 and 0.06 % folded voxels, against 0.561 and 0.45 % with an
update every step, whose discriminator won as training went on: 0.542 and 1.9 % after 1500
steps; with the recipe, 0.588 and 0.25 % after 1500 steps — the discriminator still gains
with time), diffusion weight 10 (1 let the adversarial term fold the field in 2D: diffusion
0.3–0.4 voxel², Dice 0.27–0.34).

CPU scaling: the paper trained on 64³ patches of 1 mm brains; learnreg trains on whole
images at reduced resolution (a 4 mm LPBA40 brain, 40×48×40, fits inside one such patch;
2D slices in the fast tests), with a smaller U-Net. Fully convolutional, so prediction runs on
any grid that is a multiple of ``2**len(enc_features)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from learnreg.core.options import check_option
from learnreg.losses.adversarial import ADVERSARIAL_KINDS, discriminator_loss, generator_loss
from learnreg.losses.terms import LossSpec
from learnreg.methods.base import MethodOutput, RegistrationBatch
from learnreg.methods.registry import register_method
from learnreg.methods.voxelmorph import VoxelMorph
from learnreg.nn.discriminator import Discriminator

__all__ = ["AdversarialSimilarityNetwork"]


@register_method(
    "fan-adversarial",
    year=2018,
    ndim="2D/3D",
    transform="dense displacement",
    loss="adversarial (discriminator of alignment) + smoothness",
    supervision="unsupervised (adversarial)",
    reference="Fan et al., MICCAI 2018 / MedIA 2019",
    aliases=("fan2018", "adversarial-similarity"),
)
class AdversarialSimilarityNetwork(VoxelMorph):
    """Fan et al.'s registration network trained by a discriminator of alignment.

    Args:
        ndim, enc_features, dec_features, norm, coord_conv, integration_steps,
            int_downsize: the registration network (:class:`~learnreg.methods.voxelmorph.
            VoxelMorph`'s U-Net and head).
        regularization: smoothness of the predicted field, named weighted regularizers
            (default ``{"diffusion": 10.0}``).
        adversarial_weight: weight of the generator's adversarial term.
        adversarial: ``"bce"`` (the paper's cross-entropy) or ``"lsgan"``.
        discriminator_features, discriminator_norm: the discriminator's conv blocks.
        discriminator_output: ``"patch"`` (one judgement per receptive field, PatchGAN;
            default) or ``"global"`` (one per pair).
        positive_blend: α of the positive pairs ``(fixed, α fixed + (1 − α) warped + noise)``,
            in (0, 1].
        positive_noise: σ of the instance noise added to every pair the discriminator
            judges in training (intensity units).
    """

    allow_no_similarity: ClassVar[bool] = True
    group_modules: ClassVar[dict[str, tuple[str, ...]]] = {"discriminator": ("discriminator",)}

    def __init__(
        self,
        ndim: int = 3,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        regularization: LossSpec = None,
        adversarial_weight: float = 1.0,
        adversarial: str = "bce",
        discriminator_features: Sequence[int] = (16, 32, 64, 64),
        discriminator_norm: str | None = None,
        discriminator_output: str = "patch",
        positive_blend: float = 0.8,
        positive_noise: float = 0.02,
        integration_steps: int = 0,
        int_downsize: int = 1,
        norm: str | None = None,
        coord_conv: bool = False,
    ) -> None:
        check_option("adversarial", adversarial, ADVERSARIAL_KINDS)
        if not 0 < positive_blend <= 1 or positive_noise < 0 or adversarial_weight <= 0:
            raise ValueError(
                f"{self.name}: need 0 < positive_blend <= 1, positive_noise >= 0 and "
                f"adversarial_weight > 0; got {positive_blend}, {positive_noise}, "
                f"{adversarial_weight}"
            )
        if regularization is None:
            regularization = {"diffusion": 10.0}
            self.resolve(regularization=regularization)
        super().__init__(
            ndim,
            enc_features,
            dec_features,
            similarity=None,
            regularization=regularization,
            integration_steps=integration_steps,
            int_downsize=int_downsize,
            norm=norm,
            coord_conv=coord_conv,
        )
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial = adversarial
        self.positive_blend, self.positive_noise = float(positive_blend), float(positive_noise)
        self.discriminator = Discriminator(
            ndim, 2, discriminator_features, norm=discriminator_norm, output=discriminator_output
        )

    def aligned_logit(self, fixed: Tensor, image: Tensor) -> Tensor:
        """The discriminator's logit that ``image`` is aligned with ``fixed``; in training,
        both images get Gaussian noise of σ ``positive_noise`` first (instance noise, the same
        for positive and negative pairs, so noise alone tells the discriminator nothing)."""
        pair = torch.cat([fixed, image], 1)
        if self.training and self.positive_noise:
            pair = pair + self.positive_noise * torch.randn_like(pair)
        return self.discriminator(pair)

    def positive(self, fixed: Tensor, warped: Tensor) -> Tensor:
        """The second image of a positive pair: the fixed image, slightly perturbed by the
        warped moving image (``α fixed + (1 − α) warped``, detached)."""
        a = self.positive_blend
        return a * fixed + (1 - a) * warped.detach()

    def supervision(
        self, batch: RegistrationBatch, output: MethodOutput
    ) -> dict[str, tuple[float, Tensor]]:
        fake = self.aligned_logit(batch.fixed, output.warped)
        return {"adversarial": (self.adversarial_weight, generator_loss(fake, self.adversarial))}

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        out = super().loss(batch, output)
        real = self.aligned_logit(batch.fixed, self.positive(batch.fixed, output.warped))
        fake = self.aligned_logit(batch.fixed, output.warped.detach())
        out["discriminator"] = discriminator_loss(real, fake, self.adversarial)
        out["total_discriminator"] = out["discriminator"]
        return out
