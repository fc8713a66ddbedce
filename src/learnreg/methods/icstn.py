"""IC-STN: the inverse compositional spatial transformer network (recurrent, shared weights).

Lin and Lucey, "Inverse Compositional Spatial Transformer Networks", CVPR 2017: instead of
stacking spatial transformers that each resample the previous *warped* image (boundary
effects, blur, one network per stage), one geometric predictor is applied recurrently
``K`` times. Step ``k`` warps the **original** moving image by the current parameters
``p_k``, predicts an update ``Δp_k`` from it, and composes the *parameters*:
``p_{k+1} = p_k ∘ Δp_k`` — the learned analogue of inverse-compositional Lucas–Kanade.
Gradients flow through every step (warp and composition). The loss is on the final warp.

Here the predictor sees the pair (fixed, moving ∘ T_k) stacked as two channels (the paper's
alignment experiments have no template: it sees the warped image alone) and regresses an
affine update (:class:`learnreg.spatial.linear.Affine` parameters ``[L − I | t]`` about the
grid centre, voxel index coordinates, fixed → moving). ``T_{k+1} = T_k ∘ ΔT_k`` (``ΔT_k``
acts first, on the fixed grid: ``moving ∘ T_k ∘ ΔT_k ≈ fixed``). Supervised with synthetic
affine perturbations of real images (:class:`learnreg.data.random_warps.RandomWarpPairs`,
``kind="affine"``); loss: Rocco et al.'s transformed-grid loss on the final parameters
(:class:`learnreg.methods.geometric_matching.GlobalTransformModel`), ``grid_error`` in voxels.
The recurrence runs in index coordinates of the network grid; :meth:`ICSTN.forward` returns
the composed affine as a world :class:`~learnreg.spatial.affine.AffineTransform`
(``index_matrix_to_world``; saved as an ITK ``.mat``). ``extras``: ``"params"`` (final),
``"matrix"`` (index coordinates), ``"step_params"`` ``(N, K, P)`` (after each step).

Scaled down for CPUs (documented, configurable): Lin & Lucey's GTSRB predictor is two conv
layers (7×7) and fully connected layers on 36×36 images with K = 4; here a VGG-style
two-channel encoder (:class:`learnreg.nn.regression.ParameterRegressor`: conv 3×3 blocks of
16, 32, 64 channels, batch norm, ReLU, 2× max pooling after each), one hidden layer of 128
units, 64×64 inputs, K = 4. Works in 2D and 3D.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.geometric_matching import (
    GlobalTransformModel,
    affine_matrix,
    matrix_to_affine_params,
)
from learnreg.methods.registry import register_method
from learnreg.nn.regression import ParameterRegressor
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.frame import index_matrix_to_world
from learnreg.spatial.sampling import warp

__all__ = ["ICSTN"]


@register_method(
    "icstn",
    year=2017,
    ndim="2D/3D",
    transform="affine (recurrently composed)",
    loss="transformed grid loss on the final warp",
    supervision="supervised (synthetic affine perturbations)",
    reference="Lin and Lucey, CVPR 2017",
    aliases=("ic-stn", "inverse-compositional-stn"),
)
class ICSTN(RegistrationMethod):
    """IC-STN: one affine predictor applied K times, composing parameters, not images.

    Args:
        ndim: 2 or 3.
        shape: input size (default 64×64, 40×48×40 in 3D): the FC head fixes it.
        steps: recurrent applications ``K`` (Lin & Lucey: 4).
        features, downsample_after: the two-channel VGG-style encoder.
        hidden, dropout: the fully connected head.
        norm: of the encoder (default ``"batch"``; Lin & Lucey's small predictors have none,
            but without it the CPU-length runs here barely move from the identity).
        coord_conv: CoordConv first layer (ablations).
        loss_points: points per axis of the grid loss.
        linear_scale, translation_scale: units of the regressed ``L − I`` and translation
            (default ``max(shape) / 16`` voxels).
    """

    def __init__(
        self,
        ndim: int = 2,
        shape: Sequence[int] | None = None,
        steps: int = 4,
        features: Sequence[int] = (16, 32, 64),
        downsample_after: Sequence[int] = (0, 1, 2),
        hidden: Sequence[int] = (128,),
        dropout: float = 0.0,
        norm: str | None = "batch",
        coord_conv: bool = False,
        loss_points: int = 20,
        linear_scale: float = 0.1,
        translation_scale: float | None = None,
    ) -> None:
        super().__init__()
        check_option("ndim", ndim, (2, 3))
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        shape = {2: (64, 64), 3: (40, 48, 40)}[ndim] if shape is None else shape
        self.model = GlobalTransformModel(shape, "affine", loss_points=loss_points)
        if self.model.ndim != ndim:
            raise ValueError(f"shape {tuple(shape)} is not {ndim}D")
        self.shape, self.ndim, self.steps = self.model.shape, ndim, int(steps)
        t_scale = max(self.shape) / 16 if translation_scale is None else float(translation_scale)
        if not (linear_scale > 0 and t_scale > 0):
            raise ValueError("linear_scale and translation_scale must be > 0")
        self.resolve(shape=self.shape, translation_scale=t_scale)
        unit = torch.full((ndim, ndim + 1), float(linear_scale))
        unit[:, ndim] = t_scale
        self.register_buffer("unit", unit.flatten(), persistent=False)
        enc = {
            "mode": "two-channel",
            "features": tuple(features),
            "downsample_after": tuple(downsample_after),
            "pooling": "max",
            "norm": norm,
            "coord_conv": coord_conv,
        }
        head = {"hidden": tuple(hidden), "dropout": dropout, "init_std": 1e-3}
        self.net = ParameterRegressor(ndim, self.shape, self.model.num_params, enc, head)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        want = (1, *self.shape)
        if fixed.shape != moving.shape or fixed.dim() != self.ndim + 2 or fixed.shape[1:] != want:
            raise ValueError(
                f"{self.name}: fixed and moving must both be (N, {', '.join(map(str, want))}) "
                f"(shape); got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )

    def update(self, fixed: Tensor, warped: Tensor) -> Tensor:
        """One predictor step: the affine update ``Δp`` ``(N, D(D+1))`` for a warped pair."""
        return self.net(fixed, warped) * self.unit.to(fixed.dtype)

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        self.check_pair(fixed, moving)
        grid = unit_grid(fixed) if grid is None else grid
        index = Grid(self.shape)  # the recurrence works on index points of the network grid
        n, d = fixed.shape[0], self.ndim
        matrix = torch.eye(d + 1, dtype=fixed.dtype, device=fixed.device).expand(n, d + 1, d + 1)
        history = []
        for k in range(self.steps):
            # always warp the ORIGINAL moving image by the current parameters
            if k == 0:
                warped = moving
            else:
                warped = warp(moving, AffineTransform(matrix).voxel_displacement(index))
            delta = affine_matrix(self.update(fixed, warped), self.shape)
            matrix = matrix @ delta  # T ∘ ΔT: the update acts first, on the fixed grid
            history.append(matrix_to_affine_params(matrix, self.shape))
        transform = AffineTransform(index_matrix_to_world(matrix, grid))
        extras = {"params": history[-1], "matrix": matrix, "step_params": torch.stack(history, 1)}
        return MethodOutput(transform, grid, moving, extras)

    def target(self, batch: RegistrationBatch) -> Tensor:
        """``batch.target`` as ``(N, D(D+1))`` affine parameters (raises if absent/bad)."""
        if batch.target is None:
            raise ValueError(
                f"{self.name}: supervised; the batch needs target = the (N, "
                f"{self.model.num_params}) affine parameters (e.g. learnreg.data.random_warps."
                "RandomWarpPairs, kind='affine')"
            )
        if batch.target.shape[0] != batch.fixed.shape[0]:
            raise ValueError(
                f"{self.name}: target has {batch.target.shape[0]} items, the batch "
                f"{batch.fixed.shape[0]}"
            )
        return self.model.check_params(batch.target, "target").to(batch.fixed.dtype)

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        target = self.target(batch)
        terms = self.model.grid_loss(output.extras["params"], target)
        with torch.no_grad():
            first = self.model.grid_loss(output.extras["step_params"][:, 0], target)
        return {"total": terms["grid_loss"], **terms, "grid_error_step0": first["grid_error"]}

    def transform_error(self, batch: RegistrationBatch, output: MethodOutput) -> Tensor:
        """Grid error per pair ``(N,)`` of the final affine, voxels of the network grid."""
        return self.model.grid_errors(output.extras["params"], self.target(batch))
