"""SVF-Net (Rohé et al., MICCAI 2017): a fully convolutional network predicting a stationary
velocity field, supervised by reference velocities from registering segmentations.

Rohé, Datar, Heimann, Sermesant and Pennec, "SVF-Net: learning deformable image registration
using shape matching", MICCAI 2017. The network sees the two images and outputs the velocity
``v`` at every voxel; ``exp(v)`` (scaling and squaring) is the diffeomorphic transform. It is
trained on the squared difference to the reference velocity (MSQ on ``v``, in voxels²), the
references coming from a registration of the pair's label maps (the paper: cardiac
segmentations registered by shape-matching demons) — so no image similarity is optimized and
the supervision is anatomical. Here the references are learnreg's own classical SVF
registration of LPBA40's one-hot label maps (:mod:`learnreg.data.reference_fields`,
``data.synthetic: {kind: svf-references}``): training uses the training subjects' labels,
through their references, and no labels at prediction.

Network: the encoder–decoder U-Net of :class:`learnreg.nn.unet.UNet` (convolutions of 3×3×3,
stride-2 downsampling, upsampling with skip connections — the U-Net-like design of the paper),
a velocity head, and VoxelMorph's integration layer; the paper's network differs in its
channel counts and depth (4 levels here, 3 in the paper at 2 mm cardiac volumes) — scaled for
CPU and LPBA40's 4 mm network grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from learnreg.methods.base import MethodOutput, RegistrationBatch, dense_target
from learnreg.methods.registry import register_method
from learnreg.methods.voxelmorph import VoxelMorph
from learnreg.spatial.fields import resize_displacement

__all__ = ["SVFNet"]


@register_method(
    "svf-net",
    year=2017,
    ndim="3D (2D by the same layers)",
    transform="stationary velocity field (diffeomorphic)",
    loss="MSQ to reference velocities",
    supervision="supervised (reference SVFs from registered label maps)",
    reference="Rohé et al., MICCAI 2017",
    aliases=("svfnet", "rohe", "rohe2017"),
)
class SVFNet(VoxelMorph):
    """SVF-Net (module docstring): U-Net → velocity, trained on ``|v − v_ref|²``.

    Args:
        ndim: 3 (the paper) or 2.
        enc_features, dec_features, norm, coord_conv: the U-Net.
        integration_steps: scaling-and-squaring steps of ``exp(v)`` (> 0).
        int_downsize: predict the velocity on a grid this many times coarser (the reference
            is resized to it and rescaled to its voxels).

    ``batch.target``: the reference velocity ``(N, D, *S)`` in voxels of the network grid.
    """

    allow_no_similarity: ClassVar[bool] = True

    def __init__(
        self,
        ndim: int = 3,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        integration_steps: int = 7,
        int_downsize: int = 1,
        norm: str | None = None,
        coord_conv: bool = False,
    ) -> None:
        if integration_steps < 1:
            raise ValueError(f"svf-net: integration_steps must be >= 1, got {integration_steps}")
        super().__init__(
            ndim,
            enc_features,
            dec_features,
            similarity=None,
            regularization={},
            integration_steps=integration_steps,
            int_downsize=int_downsize,
            norm=norm,
            coord_conv=coord_conv,
        )

    def image_weight(self) -> float:
        return 0.0

    def reference(self, batch: RegistrationBatch, field: Tensor) -> Tensor:
        """``batch.target`` on the grid of the predicted ``field``, in its voxels."""
        t = dense_target(
            batch,
            self.ndim,
            "svf-net",
            "reference velocities",
            "data.synthetic: {kind: svf-references}",
        )
        t = t.to(field.dtype)
        return t if t.shape[2:] == field.shape[2:] else resize_displacement(t, field.shape[2:])

    def supervision(
        self, batch: RegistrationBatch, output: MethodOutput
    ) -> dict[str, tuple[float, Tensor]]:
        field = output.extras["field"]
        return {"velocity_mse": (1.0, (field - self.reference(batch, field)).pow(2).mean())}

    def transform_error(self, batch: RegistrationBatch, output: MethodOutput) -> Tensor:
        """Mean ``|v − v_ref|`` per pair ``(N,)``, voxels of the velocity's grid."""
        field = output.extras["field"]
        with torch.no_grad():
            return (field - self.reference(batch, field)).norm(dim=1).flatten(1).mean(1)
