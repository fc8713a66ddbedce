"""Rigid registration by regressing the six (three in 2D) rigid parameters of a pair.

Sloan, Goatman and Siebert, "Learning Rigid Image Registration — Utilizing Convolutional
Neural Networks for Medical Image Registration", BIOIMAGING 2018: a regression ConvNet on an
image pair — a *siamese* encoder (one tower with shared weights per image, features
concatenated and merged by further convolutions) or a *two-channel* one (the pair stacked as
channels) — downsamples with **strided convolutions, no max pooling** (pooling discards the
position information a transform regressor needs), and fully connected layers regress the
rigid parameters. Supervised: mean squared error against the parameters of known random rigid
transforms applied to real volumes (:class:`learnreg.data.perturb.RandomPerturbation` with
``kind="rigid", self_pairs=True``). Inverse consistency: swapping the inputs should give the
inverse transform; with ``bidirectional=True`` every training pair is also seen swapped, with
the inverse parameters as target, and ``consistency_weight`` adds the squared distance of
``T(f, m) ∘ T(m, f)`` from the identity at the grid's corners (normalized like the
translations) to the loss; :meth:`RigidRegression.inverse_consistency_error` reports it.

Parameters follow :class:`learnreg.spatial.linear.Rigid` in voxel index coordinates of the
network grid about its centre ``(S − 1) / 2`` (:mod:`learnreg.data.perturb`): ``[ω, t]``,
radians and voxels, fixed → moving. The network predicts them normalized — rotations in units
of ``rotation_scale`` degrees, translations in units of ``translation_scale`` voxels — and the
MSE is taken on the normalized values so that both kinds weigh alike. The method's transform
is that rigid map in world space, ``G M G⁻¹`` (``G`` the network grid's index-to-world
matrix), an :class:`~learnreg.spatial.AffineTransform` written as an ITK matrix; on an
isotropic network grid it is a rigid map of world points. Validation error
(:meth:`RigidRegression.transform_error`): mean lattice-point distance in voxels.

Scaled down for CPUs (documented, configurable): a 3D siamese tower of four stride-2 conv
layers (8, 16, 32, 32 channels) plus one merged stride-2 layer (64) and one hidden fully
connected layer of 128 units, on 40×48×40 volumes (LPBA40 at 4 mm). The fully connected head
fixes the input size: ``shape``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.losses import functional as LF
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.regression import ParameterRegressor
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.frame import index_matrix_to_world
from learnreg.spatial.linear import Rigid, rotation_matrix

__all__ = ["MODES", "RigidRegression", "rigid_matrix", "invert_rigid", "rigid_errors"]

MODES = ("siamese", "two-channel")
_DEFAULT_SHAPE = {2: (64, 64), 3: (40, 48, 40)}


def rigid_matrix(params: Tensor, shape: Sequence[int]) -> Tensor:
    """Index-space matrices ``(N, D+1, D+1)`` of rigid parameters ``(N, P)`` about the centre
    of a grid of ``shape`` (differentiable)."""
    d = len(shape)
    if params.dim() != 2 or params.shape[1] != Rigid.num_params(d):
        raise ValueError(
            f"rigid parameters for a {d}D grid must be (N, {Rigid.num_params(d)}); "
            f"got {tuple(params.shape)}"
        )
    return Rigid.from_params(params, center=Grid(tuple(shape)).index_center).homogeneous()


def invert_rigid(params: Tensor) -> Tensor:
    """Parameters of the inverse rigid transforms (same centre): ``[−ω, −Rᵀ t]``."""
    if params.dim() != 2 or params.shape[1] not in (3, 6):
        raise ValueError(f"rigid parameters must be (N, 3) or (N, 6); got {tuple(params.shape)}")
    r = 1 if params.shape[1] == 3 else 3
    omega, t = params[:, :r], params[:, r:]
    rot = rotation_matrix(omega)
    return torch.cat([-omega, -(rot.transpose(1, 2) @ t.unsqueeze(-1)).squeeze(-1)], 1)


def rigid_errors(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Per pair: ``rotation`` — angle of ``R_predᵀ R_true`` (degrees) — and ``translation`` —
    ``|t_pred − t_true|`` (units of ``t``) — between rigid parameters ``(N, P)``."""
    if pred.shape != target.shape or pred.dim() != 2 or pred.shape[1] not in (3, 6):
        raise ValueError(
            f"rigid_errors: expected two (N, 3) or (N, 6) tensors, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    r = 1 if pred.shape[1] == 3 else 3
    rel = rotation_matrix(pred[:, :r].double()).transpose(1, 2) @ rotation_matrix(
        target[:, :r].double()
    )
    d = rel.shape[-1]
    cos = ((rel.diagonal(dim1=1, dim2=2).sum(-1) - (d - 2)) / 2).clamp(-1, 1)
    return {
        "rotation": torch.rad2deg(torch.arccos(cos)).to(pred.dtype),
        "translation": (pred[:, r:] - target[:, r:]).norm(dim=1),
    }


def _map(matrix: Tensor, points: Tensor) -> Tensor:
    """Points ``(K, D)`` mapped by homogeneous matrices ``(N, D+1, D+1)``: ``(N, K, D)``."""
    d = points.shape[-1]
    return points @ matrix[:, :d, :d].transpose(1, 2) + matrix[:, None, :d, d]


@register_method(
    "rigid-regression",
    year=2018,
    ndim="2D/3D",
    transform="rigid",
    loss="parameter MSE (+ inverse consistency)",
    supervision="supervised",
    reference="Sloan, Goatman and Siebert, BIOIMAGING 2018",
    aliases=("sloan",),
)
class RigidRegression(RegistrationMethod):
    """Rigid-parameter regression ConvNet (siamese or two-channel, strided convs), MSE loss.

    Args:
        ndim: 2 or 3.
        shape: network input size (the fully connected head needs it); default
            ``(40, 48, 40)`` in 3D, ``(64, 64)`` in 2D.
        mode: ``"siamese"`` (shared-weight towers, late fusion) or ``"two-channel"``.
        features: channels of the stride-2 conv layers (of each tower, or of the
            two-channel encoder).
        merge_features: stride-2 conv layers on the concatenated tower features (siamese).
        hidden: fully connected layer widths.
        norm: conv normalization (None, ``"batch"``, ``"instance"``, ``"group"``).
        coord_conv: CoordConv first layer of each encoder branch (Liu et al. 2018).
        dropout: dropout of the fully connected layers.
        rotation_scale: degrees per unit of the normalized rotation outputs.
        translation_scale: voxels per unit of the normalized translation outputs.
        bidirectional: also train on every pair swapped, against the inverse parameters.
        consistency_weight: weight of the inverse-consistency penalty (bidirectional only).
    """

    def __init__(
        self,
        ndim: int = 3,
        shape: Sequence[int] | None = None,
        mode: str = "siamese",
        features: Sequence[int] = (8, 16, 32, 32),
        merge_features: Sequence[int] = (64,),
        hidden: Sequence[int] = (128,),
        norm: str | None = None,
        coord_conv: bool = False,
        dropout: float = 0.0,
        rotation_scale: float = 10.0,
        translation_scale: float = 4.0,
        bidirectional: bool = True,
        consistency_weight: float = 0.1,
    ) -> None:
        super().__init__()
        check_option("ndim", ndim, (2, 3))
        check_option("mode", mode, MODES)
        for name, v in (
            ("rotation_scale", rotation_scale),
            ("translation_scale", translation_scale),
        ):
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if not math.isfinite(consistency_weight) or consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}")
        shape = _DEFAULT_SHAPE[ndim] if shape is None else tuple(int(s) for s in shape)
        if len(shape) != ndim:
            raise ValueError(f"shape must have {ndim} sizes, got {tuple(shape)}")
        self.resolve(shape=tuple(shape))
        self.ndim, self.shape, self.mode = ndim, tuple(shape), mode
        self.nrot = ndim * (ndim - 1) // 2
        self.rotation_scale = float(rotation_scale)
        self.translation_scale = float(translation_scale)
        self.bidirectional = bool(bidirectional)
        self.consistency_weight = float(consistency_weight)
        feats = list(features)
        self.regressor = ParameterRegressor(
            ndim,
            self.shape,
            Rigid.num_params(ndim),
            encoder={
                "mode": mode,
                "features": feats,
                "downsample_after": tuple(range(len(feats))),
                "merge_features": tuple(merge_features) if mode == "siamese" else (),
                "merge_downsample_after": tuple(range(len(merge_features))),
                "pooling": "stride",
                "norm": norm,
                "coord_conv": coord_conv,
                "negative_slope": 0.0,
            },
            head={"hidden": tuple(hidden), "dropout": dropout, "init_std": 1e-3},
        )

    # -- parameter scaling
    def scales(self, like: Tensor) -> Tensor:
        """Physical units per normalized unit ``(P,)``: radians for ω, voxels for t."""
        rot = math.radians(self.rotation_scale)
        s = [rot] * self.nrot + [self.translation_scale] * self.ndim
        return torch.tensor(s, dtype=like.dtype, device=like.device)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        if fixed.dim() != self.ndim + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"rigid-regression: fixed and moving must both be (N, 1, *S) with {self.ndim} "
                f"spatial dims; got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        if tuple(fixed.shape[2:]) != self.shape:
            raise ValueError(
                f"rigid-regression: built for images of size {self.shape}, got "
                f"{tuple(fixed.shape[2:])}; resample the pair to the network grid"
            )

    def predict_params(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """Rigid parameters ``(N, P)`` (radians, voxels) of the fixed → moving transform."""
        self.check_pair(fixed, moving)
        return self.regressor(fixed, moving) * self.scales(fixed)

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        params = self.predict_params(fixed, moving)
        grid = unit_grid(fixed) if grid is None else grid
        if grid.shape != self.shape:
            raise ValueError(f"rigid-regression: the images are not on the grid {grid}")
        matrix = rigid_matrix(params, self.shape)
        extras = {"params": params, "matrix": matrix}
        if self.training and self.bidirectional:
            extras["params_backward"] = self.predict_params(moving, fixed)
        transform = AffineTransform(index_matrix_to_world(matrix, grid))
        return MethodOutput(transform, grid, moving, extras)

    def _corner_residual(self, forward: Tensor, backward: Tensor) -> Tensor:
        """``T_f(T_b(c)) − c`` ``(N, 2**D, D)`` (voxels) at the grid corners ``c``."""
        m = rigid_matrix(forward, self.shape) @ rigid_matrix(backward, self.shape)
        corners = Grid(self.shape).index_lattice(2, m.dtype, m.device)
        return _map(m, corners) - corners

    def inverse_consistency_error(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """Mean distance (voxels) of the grid corners from their image under
        ``T(fixed, moving) ∘ T(moving, fixed)``, per pair (eval mode, no gradients)."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                f, b = self.predict_params(fixed, moving), self.predict_params(moving, fixed)
        finally:
            self.train(was)
        return self._corner_residual(f, b).norm(dim=-1).mean(-1)

    def transform_error(self, batch: RegistrationBatch, output: MethodOutput) -> Tensor:
        """Mean distance (voxels) between the points of a 5 × 5 (× 5) lattice spanning the
        grid mapped by the predicted and by the true rigid transform, per pair ``(N,)``."""
        pred = output.extras["matrix"]
        true = rigid_matrix(self._target(batch, pred), self.shape)
        lattice = Grid(self.shape).index_lattice(5, pred.dtype, pred.device)
        return (_map(pred, lattice) - _map(true, lattice)).norm(dim=-1).mean(-1)

    def _target(self, batch: RegistrationBatch, pred: Tensor) -> Tensor:
        if batch.target is None:
            raise ValueError(
                "rigid-regression is supervised: the batch needs `target`, the rigid parameters "
                "(N, P) of the known fixed→moving transform (see learnreg.data.perturb)"
            )
        target = batch.target.to(pred.dtype)
        if target.shape != (pred.shape[0], Rigid.num_params(self.ndim)):
            raise ValueError(
                f"rigid-regression: target must be (N, {Rigid.num_params(self.ndim)}) rigid "
                f"parameters, got {tuple(target.shape)}"
            )
        return target

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        """``mse`` of normalized parameters (forward, and ``mse_backward`` against the inverse
        when bidirectional), ``consistency``; errors ``rotation_error`` (degrees) and
        ``translation_error`` (voxels) for monitoring."""
        pred = output.extras["params"]
        target = self._target(batch, pred)
        scale = self.scales(pred)
        out = {"mse": LF.parameter_mse(pred / scale, target / scale)}
        total = out["mse"]
        if "params_backward" in output.extras:
            back = output.extras["params_backward"]
            out["mse_backward"] = LF.parameter_mse(back / scale, invert_rigid(target) / scale)
            res = self._corner_residual(pred, back) / self.translation_scale
            out["consistency"] = res.square().sum(-1).mean()
            total = (
                0.5 * (total + out["mse_backward"]) + self.consistency_weight * out["consistency"]
            )
        err = rigid_errors(pred.detach(), target)
        out["rotation_error"] = err["rotation"].mean()
        out["translation_error"] = err["translation"].mean()
        return {"total": total, **out}
