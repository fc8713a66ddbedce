"""Adversarial deformation regularization (Hu et al., MICCAI 2018).

The weakly supervised registration networks of :mod:`learnreg.methods.hu_weakly`
(:class:`~learnreg.methods.hu_weakly.HuGlobalLocal`: the same global affine and local dense
networks, the same composite and multi-scale Dice on labels) with the hand-made smoothness
penalty of the local displacement replaced by a learned one: a **discriminator**
(:class:`~learnreg.nn.discriminator.Discriminator`) tells the network's local dense
displacement fields (DDFs) from *reference* displacements of biomechanically plausible prostate
motion, and the registration network (the generator) is trained to make its DDFs look like
them.

* **Reference DDFs.** The paper's were finite-element (FE) simulations of TRUS-probe-induced
  prostate motion (as we recall: patient-specific meshes, varied material parameters and
  probe placements). We have no
  FE simulations; instead each training step samples, with torch's global generator (so the
  Trainer's checkpointed RNG state makes a resumed run exact), one linear-elastic loading case
  per pair (:func:`~learnreg.spatial.elastic.sample_probe_loading`: a homogeneous, isotropic
  medium solved spectrally, a Gaussian pressure blob from a random direction near the
  posterior side of the pair's **fixed gland** — channel 0 of float masks, the union of the
  labels of integer maps; its centroid and equivalent radius — plus small smooth random body
  forces, scaled to a random peak displacement; ``reference`` sets the
  :class:`~learnreg.spatial.elastic.ProbeLoading` ranges). It is a field over the fixed
  (TRUS) grid, the frame of the predicted local DDF. The simulation gives the forward motion
  ``X → X + v(X)`` of the tissue from its unloaded (MR) state to its loaded (TRUS) state; the
  method's DDF maps fixed (TRUS) points to moving (MR) points, so the reference is its
  small-strain inverse ``−v``. Not an FE model: no organ boundaries or tissue contrast, no
  contact (see the module docstring of :mod:`learnreg.spatial.elastic`).
* **Units.** Both fields are judged in mm along the index axes of the network grid: the local
  DDF (voxel units) is multiplied by the grid spacing. ``spacing`` (mm) gives it; by default
  it is the spacing of the grid the pair is given on — the Trainer passes the dataset's
  network grid, so it is known there; a pair given without a grid is on the unit grid (1 mm),
  so direct calls on such pairs should pass ``spacing``. ``posterior`` is the direction of the
  probe from the gland in world coordinates (RAS: ``(0, −1, 0)``), mapped to the index axes
  by the grid's direction.
* **Losses** (:mod:`learnreg.losses.adversarial`): the generator's multi-scale Dice +
  ``adversarial_weight`` × ``generator_loss(D(DDF))`` (+ ``reg_weight`` × bending energy,
  default 0: the adversarial term alone regularizes the local DDF), ``"total"``; the
  discriminator's loss on (reference, detached predicted) DDFs, ``"total_discriminator"``,
  trained by its own optimizer (parameter group ``discriminator``; its learning rate and the
  update ratio: ``optimizer.groups.discriminator`` / ``optimizer.groups.model.every``).
* **Conditioning.** ``condition_on_fixed`` concatenates the fixed image to the DDF (for the
  reference fields too: they were placed on that image's gland). As we recall the paper
  (not verified here), its FE simulations came from other patients than its registration
  pairs (about 71 500 simulations of 143 patients), so its reference DDFs were not paired
  with the training images; whether its discriminator also saw an image we cannot confirm.
  Our reference fields are generic loading cases, so by default the discriminator judges the
  DDF alone.

Deviations from the paper besides the reference: the CPU scale-down of
:mod:`learnreg.methods.hu_weakly` (small plain-conv networks, a few hundred Adam steps at
1e-3 for both networks); every label channel in the Dice (the paper, as we recall, trained
with the gland label alone; pass gland-only masks for that); the discriminator is learnreg's
strided-conv one (a global logit by default, PatchGAN with ``discriminator_output="patch"``);
the composite is trained end to end, so the adversarial gradient also reaches the global
network through the affinely warped input of the local one. ``adversarial_weight`` defaults
to 0.05, chosen on CPU runs of 100 steps (``tests/methods/test_hu_adversarial.py``): at 0.3
and 1.0 the global network diverged in 4 of 6 runs. The discriminator is used in training
only; prediction needs the two images alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.losses.adversarial import ADVERSARIAL_KINDS, discriminator_loss, generator_loss
from learnreg.methods.base import MethodOutput, RegistrationBatch
from learnreg.methods.hu_weakly import HuGlobalLocal
from learnreg.methods.registry import register_method
from learnreg.nn.discriminator import Discriminator
from learnreg.spatial.elastic import ProbeLoading, gland_geometry, sample_probe_loading

__all__ = ["HuAdversarial"]


@register_method(
    "hu-adversarial",
    year=2018,
    ndim="2D/3D",
    transform="affine then dense displacement (composite)",
    loss="multi-scale Dice of labels + adversarial (discriminator of simulated elastic DDFs)",
    supervision="weakly supervised (labels in training only)",
    reference="Hu et al., MICCAI 2018 (adversarial deformation regularization)",
    aliases=("adversarial-deformation-regularization",),
)
class HuAdversarial(HuGlobalLocal):
    """Hu et al.'s global + local networks, the local DDF regularized by a discriminator.

    Args:
        ndim, shape, stage, global_features, global_norm, coord_conv, enc_features,
            dec_features, scales, regularizer: as :class:`~learnreg.methods.hu_weakly.
            HuGlobalLocal` (``stage`` ``"composite"`` or ``"local"``: the global stage has no
            dense field to regularize).
        reg_weight: weight of the bending (or diffusion) energy next to the adversarial term
            (default 0, the paper's adversarial model).
        adversarial_weight: weight of the generator's adversarial term.
        adversarial: ``"bce"`` (GAN cross-entropy) or ``"lsgan"``.
        discriminator_features, discriminator_norm, discriminator_output: the discriminator.
        condition_on_fixed: give the discriminator the fixed image next to the DDF.
        spacing: mm per voxel of the network grid along its index axes (a number or one per
            axis); None: the grid's spacing (1 mm for pairs given without a grid).
        posterior: world direction of the probe from the gland (RAS; default ``(0, −1, 0)``,
            2D ``(0, −1)``).
        reference: :class:`~learnreg.spatial.elastic.ProbeLoading` fields (ranges of the
            loading cases), e.g. ``{"peak_displacement": [1.0, 3.0]}``.
        reference_pad: padding (voxels per side) of the elastic solve; None: the grid size.

    Extras as :class:`~learnreg.methods.hu_weakly.HuGlobalLocal`. Loss terms: ``dice``, the
    regularizer's, ``adversarial``, ``total``, ``discriminator``, ``total_discriminator``.
    """

    group_modules: ClassVar[dict[str, tuple[str, ...]]] = {"discriminator": ("discriminator",)}
    init_methods: ClassVar[tuple[str, ...]] = ("hu-global-local",)  # its global stage

    def __init__(
        self,
        ndim: int = 3,
        shape: Sequence[int] | None = None,
        stage: str = "composite",
        global_features: Sequence[int] = (8, 16, 32, 64, 128),
        global_norm: str | None = None,
        coord_conv: bool = False,
        enc_features: Sequence[int] = (16, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 16, 16),
        scales: Sequence[float] = (0, 1, 2, 4, 8, 16),
        reg_weight: float = 0.0,
        regularizer: str = "bending",
        adversarial_weight: float = 0.05,
        adversarial: str = "bce",
        discriminator_features: Sequence[int] = (16, 32, 64, 64),
        discriminator_norm: str | None = None,
        discriminator_output: str = "global",
        condition_on_fixed: bool = False,
        spacing: float | Sequence[float] | None = None,
        posterior: Sequence[float] | None = None,
        reference: dict | None = None,
        reference_pad: int | Sequence[int] | None = None,
    ) -> None:
        check_option("adversarial", adversarial, ADVERSARIAL_KINDS)
        if stage == "global":
            raise ValueError(
                "hu-adversarial regularizes the local dense displacement: stage must be "
                "'composite' or 'local', got 'global' (train the global stage with "
                "hu-global-local and start from its checkpoint)"
            )
        if adversarial_weight <= 0:
            raise ValueError(
                f"hu-adversarial: adversarial_weight must be > 0, got {adversarial_weight}"
            )
        super().__init__(
            ndim,
            shape,
            stage,
            global_features,
            global_norm,
            coord_conv,
            enc_features,
            dec_features,
            scales,
            reg_weight,
            regularizer,
        )
        if spacing is not None:
            sp = [float(spacing)] * ndim if isinstance(spacing, int | float) else list(spacing)
            if len(sp) != ndim or min(float(s) for s in sp) <= 0:
                raise ValueError(
                    f"hu-adversarial: spacing must be a positive number or {ndim} of them "
                    f"(mm per voxel), got {spacing!r}"
                )
            spacing = tuple(float(s) for s in sp)
        self.spacing: tuple[float, ...] | None = spacing
        if posterior is None:
            posterior = (0.0, -1.0, 0.0)[:ndim]
            self.resolve(posterior=list(posterior))
        if len(posterior) != ndim or not any(float(p) for p in posterior):
            raise ValueError(
                f"hu-adversarial: posterior must be a non-zero {ndim}D world direction, got "
                f"{posterior!r}"
            )
        self.posterior = torch.tensor([float(p) for p in posterior], dtype=torch.float64)
        try:
            self.loading = ProbeLoading(**{k: _tuple(v) for k, v in (reference or {}).items()})
        except TypeError as e:
            raise ValueError(f"hu-adversarial: reference: {e}") from None
        if reference_pad is not None:
            pads = [reference_pad] * ndim if isinstance(reference_pad, int) else reference_pad
            if len(pads) != ndim or min(int(q) for q in pads) < 0:
                raise ValueError(
                    f"hu-adversarial: reference_pad must be a voxel count >= 0 or {ndim} of "
                    f"them, got {reference_pad!r}"
                )
        self.reference_pad = reference_pad
        self.adversarial_weight, self.adversarial = float(adversarial_weight), adversarial
        self.condition_on_fixed = bool(condition_on_fixed)
        self.discriminator = Discriminator(
            ndim,
            ndim + int(self.condition_on_fixed),
            discriminator_features,
            norm=discriminator_norm,
            output=discriminator_output,
        )

    def field_spacing(self, grid: Grid) -> tuple[float, ...]:
        """mm per voxel along the index axes: ``spacing``, or the grid's. A ValueError when
        both are known (the grid is not the unit grid) and disagree."""
        own = tuple(float(s) for s in grid.spacing)
        if self.spacing is None:
            return own
        unit = all(abs(s - 1) < 1e-9 for s in own)
        if not unit and any(abs(a - b) > 1e-6 * b for a, b in zip(self.spacing, own, strict=True)):
            raise ValueError(
                f"{self.name}: spacing {self.spacing} mm disagrees with the network grid's "
                f"spacing {own}; leave spacing unset to take the grid's"
            )
        return self.spacing

    def reference_displacements(self, batch: RegistrationBatch, grid: Grid) -> Tensor:
        """One simulated fixed → moving DDF per pair, ``(N, D, *S)`` in mm along the index
        axes of ``grid``, placed on the pair's fixed gland (torch's global generator)."""
        spacing = self.field_spacing(grid)
        labels = batch.fixed_labels
        if labels is None:
            raise ValueError(
                f"{self.name}: the loss needs fixed_labels (the gland places the probe)"
            )
        gland = labels[:, 0] if labels.is_floating_point() else (labels[:, 0] > 0)
        centre, radius = gland_geometry(gland.float(), spacing)
        direction = torch.tensor(grid.direction, dtype=torch.float64)
        posterior = direction.T @ self.posterior  # world → index axes (orthonormal direction)
        v = sample_probe_loading(
            labels.shape[0],
            grid.shape,
            spacing,
            centre=centre,
            radius=radius,
            posterior=posterior.tolist(),
            loading=self.loading,
            pad=self.reference_pad,
            dtype=batch.fixed.dtype,
            device=batch.fixed.device,
        )
        return -v  # small-strain inverse of the tissue's forward motion

    def judge(self, field_mm: Tensor, batch: RegistrationBatch) -> Tensor:
        """The discriminator's logits that ``field_mm`` is a reference DDF."""
        x = torch.cat([field_mm, batch.fixed], 1) if self.condition_on_fixed else field_mm
        return self.discriminator(x)

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        out = super().loss(batch, output)
        local = output.extras["local_displacement"]
        d = local.shape[1]
        spacing = self.field_spacing(output.grid)
        predicted = local * torch.tensor(spacing, dtype=local.dtype, device=local.device).view(
            1, d, *[1] * d
        )
        with torch.no_grad():
            reference = self.reference_displacements(batch, output.grid)
        out["adversarial"] = generator_loss(self.judge(predicted, batch), self.adversarial)
        out["total"] = out["total"] + self.adversarial_weight * out["adversarial"]
        real = self.judge(reference, batch)
        fake = self.judge(predicted.detach(), batch)
        out["discriminator"] = discriminator_loss(real, fake, self.adversarial)
        out["total_discriminator"] = out["discriminator"]
        return out


def _tuple(value):
    return tuple(value) if isinstance(value, list | tuple) else value
