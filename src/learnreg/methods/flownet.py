"""FlowNetS and FlowNetC: supervised optical-flow networks (Dosovitskiy et al., ICCV 2015).

The network (:class:`learnreg.nn.flownet.FlowNet`) sees the fixed and the moving image (the
paper's first and second frame) and predicts a flow at five scales, the finest at 1/4 of the
input size; the dense transform is that finest flow upsampled linearly to the input grid
(the paper's bilinear upsampling), a :class:`~learnreg.spatial.displacement.
DisplacementField` fixed → moving (``fixed(x) ≈ moving(x + u(x))``, the optical-flow
convention). Training is supervised by the end-point error against a known dense field at
every scale (the target downsampled to each flow's grid), weighted ``0.005, 0.01, 0.02,
0.08, 0.32`` from ``flow2`` to ``flow6`` and summed over pixels (FlowNet's Caffe training
definition), flows in units of input pixels divided by ``div_flow = 20``.

The paper trained on Flying Chairs (chairs pasted on photographs, each moving by a random
affine). Here the pairs are real photographs and brain slices warped by a random affine plus
a smooth multi-frequency field (:class:`learnreg.data.random_warps.RandomWarpPairs`,
``kind="dense"``; ``data.synthetic: {kind: warp, transform: dense}``): the same idea —
known dense motion over real texture — without the chairs' discontinuities.

Scaled down for CPUs (configurable, documented): channels × ``width`` = 1/4 of the paper's,
64×64 inputs instead of 384×512, so FlowNetC's correlation uses ``max_displacement = 4``
and ``stride2 = 1`` at 1/8 resolution (±32 input pixels; the paper: 20 and 2 at 1/8 of
384×512, ±160 pixels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from learnreg.core.grid import Grid
from learnreg.losses import functional as LF
from learnreg.methods.base import (
    MethodOutput,
    RegistrationBatch,
    RegistrationMethod,
    dense_target,
    unit_grid,
)
from learnreg.methods.registry import register_method
from learnreg.nn.correlation import LocalCorrelation
from learnreg.nn.flownet import FlowNet
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.fields import resize_linear

__all__ = ["FLOWNET_LOSS_WEIGHTS", "FlowNetMethod", "FlowNetS", "FlowNetC", "endpoint_error"]

#: FlowNet's multi-scale loss weights, ``flow2`` (finest) to ``flow6``.
FLOWNET_LOSS_WEIGHTS = (0.005, 0.01, 0.02, 0.08, 0.32)


def endpoint_error(predicted: Tensor, target: Tensor) -> Tensor:
    """Mean end-point error per pair ``(N,)``: ``mean_x |u_pred(x) − u_true(x)|`` of fields
    ``(N, D, *S)`` (their units)."""
    return LF.field_l2(predicted, target, reduction="none")


class FlowNetMethod(RegistrationMethod):
    """FlowNet as a registration method: shared by FlowNetS, FlowNetC and the unsupervised
    FlowNet-style networks. Subclasses choose the correlation and the loss.

    Args:
        ndim: 2 (the paper) or 3.
        width: channel multiplier of the paper's network (0.25: a quarter of its channels).
        div_flow: the network predicts flows in input voxels divided by this (FlowNet: 20).
        loss_weights: of the end-point errors of ``flow2`` … ``flow6``.
        max_displacement, stride2, patch_size: FlowNetC's correlation (ignored by FlowNetS).
        normalize_correlation: FlowNetC correlates zero-mean, unit-length features
            (:class:`FlowNetC`; ``False``: the paper's raw products).
        coord_conv: ``conv1`` as a CoordConv.
    """

    correlation: bool = False

    def __init__(
        self,
        ndim: int = 2,
        width: float = 0.25,
        div_flow: float = 20.0,
        loss_weights: Sequence[float] = FLOWNET_LOSS_WEIGHTS,
        max_displacement: int = 4,
        stride2: int = 1,
        patch_size: int = 1,
        normalize_correlation: bool = True,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"{type(self).__name__}: ndim must be 2 or 3, got {ndim}")
        if len(loss_weights) != 5 or any(w < 0 for w in loss_weights):
            raise ValueError(
                f"{type(self).__name__}: loss_weights are 5 non-negative weights (flow2 to "
                f"flow6), got {list(loss_weights)}"
            )
        if not div_flow > 0:
            raise ValueError(f"{type(self).__name__}: div_flow must be > 0, got {div_flow}")
        corr = (
            LocalCorrelation(max_displacement, 1, stride2, patch_size) if self.correlation else None
        )
        self.net = FlowNet(ndim, 1, width, corr, coord_conv)
        self.ndim, self.div_flow = ndim, float(div_flow)
        self.loss_weights = tuple(float(w) for w in loss_weights)

    @property
    def size_multiple(self) -> int:
        return self.net.size_multiple

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        m = self.size_multiple
        if (
            fixed.dim() != self.ndim + 2
            or fixed.shape != moving.shape
            or fixed.shape[1] != 1
            or any(s % m for s in fixed.shape[2:])
        ):
            raise ValueError(
                f"{self.name or type(self).__name__}: fixed and moving must both be (N, 1, *S)"
                f" with {self.ndim} spatial sizes divisible by {m}; got {tuple(fixed.shape)} "
                f"and {tuple(moving.shape)}"
            )

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        self.check_pair(fixed, moving)
        grid = unit_grid(fixed) if grid is None else grid
        flows = self.net(fixed, moving)  # finest first, input voxels / div_flow
        finest = flows[0]
        coarse = grid.resized(finest.shape[2:])
        shape, small = fixed.shape[2:], finest.shape[2:]
        ratio = [(c - 1) / (s - 1) for c, s in zip(small, shape, strict=True)]
        to_coarse = torch.tensor(ratio, dtype=finest.dtype, device=finest.device)
        u = finest * self.div_flow * to_coarse.view(1, -1, *([1] * self.ndim))
        return MethodOutput(DisplacementField(coarse, u), grid, moving, {"flows": flows})

    # -- supervision by the true dense field
    def target(self, batch: RegistrationBatch) -> Tensor:
        """``batch.target``: the true displacement ``(N, D, *S)`` in voxels of the grid."""
        return dense_target(batch, self.ndim, self.name)

    def multiscale_epe(self, flows: Sequence[Tensor], target: Tensor) -> Tensor:
        """FlowNet's loss: ``Σ_k w_k · mean_N Σ_x |flow_k(x) − target_k(x) / div_flow|``."""
        total = target.new_zeros(())
        for w, flow in zip(self.loss_weights, flows, strict=True):
            if w == 0:
                continue
            t = resize_linear(target, flow.shape[2:]) / self.div_flow
            total = total + w * (flow - t).norm(dim=1).flatten(1).sum(1).mean()
        return total

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        target = self.target(batch)
        total = self.multiscale_epe(output.extras["flows"], target)
        with torch.no_grad():
            epe = endpoint_error(output.displacement, target).mean()
        return {"total": total, "epe": epe}

    def transform_error(self, batch: RegistrationBatch, output: MethodOutput) -> Tensor:
        """End-point error per pair ``(N,)`` of the full-resolution flow, voxels."""
        return endpoint_error(output.displacement, self.target(batch))


@register_method(
    "flownet-s",
    year=2015,
    ndim="2D (3D by the same layers)",
    transform="dense displacement (optical flow)",
    loss="multi-scale end-point error",
    supervision="supervised (synthetic flows on real images)",
    reference="Dosovitskiy et al., ICCV 2015",
    aliases=("flownets", "flownet-simple"),
)
class FlowNetS(FlowNetMethod):
    """FlowNetS: the two images stacked as channels of one encoder–decoder (module doc)."""

    correlation = False


@register_method(
    "flownet-c",
    year=2015,
    ndim="2D (3D by the same layers)",
    transform="dense displacement (optical flow)",
    loss="multi-scale end-point error",
    supervision="supervised (synthetic flows on real images)",
    reference="Dosovitskiy et al., ICCV 2015",
    aliases=("flownetc", "flownet-correlation"),
)
class FlowNetC(FlowNetMethod):
    """FlowNetC: siamese streams, a windowed correlation layer, then FlowNetS's layers.

    One measured deviation: the correlation compares feature vectors made zero-mean and unit
    length at each position (``normalize_correlation``, their cosine) instead of the paper's
    raw mean product. With the raw products the network did not learn at CPU scale: on the
    tests' protocol (width 0.25, 64×64 dense warps of real images, Adam 1e-3, batch 8, 32
    validation pairs of unseen images, identity end-point error 3.53 px) it stayed at 3.55 px
    after 500 steps (also at learning rates 5e-4 and 1e-4 over 1800 steps, with the products
    scaled by 10, or with features only centred) — the products are dominated by the mean
    feature level shared by all displacements; normalized, it reached 2.54 px at 500 steps
    and 1.83 px at 750 with seed 0 (FlowNetS: 2.47 px at 500). Even so it is not reliable at
    this scale: seeds 1 and 2 stayed at the identity through 1750 steps, as did the 2000-step
    run of ``benchmarks/dense_fields_2d.py`` (also tried without effect: standardizing the
    correlation volume, near-zero flow heads, ``max_displacement`` 2, no ``conv_redir``,
    128×128 inputs with twice the motion, learning rate 1e-4, and three times the motion at
    64×64 — translation 9 px, field magnitudes 6 and 3 px, about the paper's motion per 1/8
    cell — where seed 1 went from 7.57 px only to 7.53 px in 1000 steps).
    """

    correlation = True
