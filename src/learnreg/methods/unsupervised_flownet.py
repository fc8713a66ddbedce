"""Shan et al. 2018: an unsupervised FlowNet-style registration network.

Shan, Yan, Guo, Eric and Bhanu, "Unsupervised end-to-end learning for deformable medical image
registration", arXiv:1711.08608 (2018): FlowNet's encoder–decoder (the "simple" variant,
:class:`learnreg.nn.flownet.FlowNet` without correlation) predicts the dense flow from the
stacked fixed and moving images; a spatial transformer warps the moving image by the flow
upsampled to full resolution; no ground-truth field is needed: the loss is the photometric
L1 difference between the fixed and the warped moving image plus an explicit penalty on the
flow's spatial gradient (``smoothness`` × mean ``|∂u|`` — total variation — or its square,
``penalty="l2"``), on the full-resolution flow in voxels. Trained here on real 2D brain slices
(ANTs' examples, LPBA40 slices), the paper's data being 2D brain MR slices as well.

Scaled down for CPUs like :mod:`learnreg.methods.flownet` (a quarter of the channels, 64×64
inputs). The loss is applied to the finest flow only; the coarser flows are the decoder's
intermediate predictions, as in FlowNet's refinement.
"""

from __future__ import annotations

from torch import Tensor

from learnreg.core.options import check_option
from learnreg.losses import functional as LF
from learnreg.methods.base import MethodOutput, RegistrationBatch
from learnreg.methods.flownet import FlowNetMethod
from learnreg.methods.registry import register_method

__all__ = ["ShanUnsupervised", "PENALTIES"]

PENALTIES = ("l1", "l2")


@register_method(
    "shan-unsupervised",
    year=2018,
    ndim="2D (3D by the same layers)",
    transform="dense displacement",
    loss="photometric L1 + flow-gradient penalty",
    supervision="unsupervised",
    reference="Shan et al., arXiv:1711.08608 (2018)",
    aliases=("shan", "shan2018", "flownet-unsupervised"),
)
class ShanUnsupervised(FlowNetMethod):
    """FlowNetS-style network trained without ground truth: L1 photometric + smoothness.

    Args:
        ndim, width, div_flow: of :class:`~learnreg.methods.flownet.FlowNetMethod`.
        smoothness: weight of the flow-gradient penalty.
        penalty: ``"l1"`` (mean absolute forward differences, total variation) or ``"l2"``
            (mean squared, diffusion).
        coord_conv: ``conv1`` as a CoordConv.
    """

    correlation = False

    def __init__(
        self,
        ndim: int = 2,
        width: float = 0.25,
        div_flow: float = 20.0,
        smoothness: float = 0.05,
        penalty: str = "l1",
        coord_conv: bool = False,
    ) -> None:
        super().__init__(ndim, width, div_flow, coord_conv=coord_conv)
        check_option("penalty", penalty, PENALTIES)
        if not smoothness >= 0:
            raise ValueError(f"{self.name}: smoothness must be >= 0, got {smoothness}")
        self.smoothness, self.penalty = float(smoothness), penalty

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        similarity = LF.l1(batch.fixed, output.warped)
        field = output.displacement
        smooth = LF.total_variation(field) if self.penalty == "l1" else LF.diffusion(field)
        total = similarity + self.smoothness * smooth
        return {"total": total, "similarity": similarity, "smoothness": smooth}
