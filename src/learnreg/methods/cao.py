"""Inter-modality registration supervised by intra-modality similarity (Cao et al.).

Cao, Yang, Wang, Xue, Wang and Shen, "Deep learning based inter-modality image registration
supervised by intra-modality similarity", MLMI 2018 (the review's Cao 2017 line of work). A
U-Net takes an inter-modality pair (in the paper pelvic CT and MR) and predicts a dense
displacement. Training never compares the two modalities: each training subject has both
images, pre-aligned, so the warped moving image is scored by NCC against the *fixed subject's
image in the moving image's modality*, and ("dual") the moving subject's image in the fixed
modality, warped by the same field, against the fixed image; an explicit smoothness term
(squared field gradient) regularizes the field. At prediction the network needs only the
inter-modality pair — no paired image, no similarity across modalities.

Data: no aligned same-subject multimodal brain images exist in ``../shared/data`` or in a
package registry; :mod:`learnreg.data.modalities` pairs each LPBA40 T1 volume with a T2-like
twin made from it (``data.synthetic: {kind: modality-pairs}``; read that module for what and
why). Moving = a training subject's T1, fixed = the atlas's T2-like image.

Scaled for CPU: the paper trains on 68³ patches at about 1 mm; here the network sees whole
volumes on a 4 mm (3D) or 2 mm (2D slices) grid — a whole 40×48×40 volume has a quarter of a
68³ patch's voxels, so patches, the paper's device for GPU memory, are not needed; the U-Net
has :class:`~learnreg.methods.voxelmorph.VoxelMorph`'s encoder–decoder (4 levels), not the
paper's channel counts. Labels are used for validation Dice only, never in the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor

from learnreg.losses.terms import LossSpec
from learnreg.methods.base import MethodOutput, RegistrationBatch
from learnreg.methods.registry import register_method
from learnreg.methods.voxelmorph import VoxelMorph
from learnreg.spatial.sampling import warp

__all__ = ["CaoIntraModality"]

SOURCE = "data.synthetic: {kind: modality-pairs}"


@register_method(
    "cao-intermodality",
    year=2018,
    ndim="3D (2D by the same layers)",
    transform="dense displacement",
    loss="intra-modality NCC (dual) + smoothness",
    supervision="unsupervised (paired same-subject images of the other modality)",
    reference="Cao et al., MLMI 2018",
    aliases=("cao", "cao2017", "cao2018"),
)
class CaoIntraModality(VoxelMorph):
    """Cao et al.'s inter-modality U-Net trained by intra-modality NCC (module docstring).

    Args:
        ndim: 3 (the paper) or 2.
        enc_features, dec_features, norm, coord_conv: the U-Net.
        similarity: the intra-modality term, a registered similarity by name or spec (the
            paper's ``"ncc"``; ``"lncc"``, ``"mse"`` also accepted).
        dual: also score the moving subject's fixed-modality image, warped, against the fixed
            image, and average the two terms (the paper's dual-modality supervision).
        reg_weight: weight of the smoothness (diffusion) term; ``regularization`` replaces it.

    ``batch.target``: ``(N, 2, *S)``, channel 0 the fixed subject in the moving image's
    modality, channel 1 the moving subject in the fixed image's modality (both on the network
    grid, aligned with ``fixed`` and ``moving`` respectively).
    """

    similarity_losses: ClassVar[tuple[str, ...] | None] = ("ncc", "lncc", "mse")

    def __init__(
        self,
        ndim: int = 3,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        similarity: LossSpec = "ncc",
        dual: bool = True,
        reg_weight: float | None = 1.0,
        regularization: LossSpec = None,
        norm: str | None = None,
        coord_conv: bool = False,
    ) -> None:
        super().__init__(
            ndim,
            enc_features,
            dec_features,
            similarity=similarity,
            reg_weight=None if regularization is not None else reg_weight,
            regularization=regularization,
            norm=norm,
            coord_conv=coord_conv,
        )
        self.dual = bool(dual)

    def counterparts(self, batch: RegistrationBatch) -> tuple[Tensor, Tensor]:
        """``(fixed subject in the moving modality, moving subject in the fixed modality)``
        from ``batch.target``; a ValueError naming the data source when missing."""
        t, f = batch.target, batch.fixed
        want = (f.shape[0], 2, *f.shape[2:])
        if t is None or tuple(t.shape) != want:
            got = "none" if t is None else tuple(t.shape)
            raise ValueError(
                f"{self.name}: trained by intra-modality similarity; the batch needs target "
                f"{want} (each image's same-subject counterpart in the other modality, e.g. "
                f"{SOURCE}), got {got}"
            )
        t = t.to(f.dtype)
        return t[:, :1], t[:, 1:]

    def similarity_loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        fixed_as_moving, moving_as_fixed = self.counterparts(batch)
        sim = self.image_loss(fixed_as_moving, output.warped)
        if self.dual:
            other = self.image_loss(batch.fixed, warp(moving_as_fixed, output.displacement))
            sim = {k: 0.5 * (sim[k] + other[k]) for k in sim}
        return sim
