"""Geometric matching: siamese features, a correlation layer and a regressor of global warps.

Rocco, Arandjelović and Sivic, "Convolutional neural network architecture for geometric
matching", CVPR 2017:

1. **feature extraction**: one CNN with shared weights (siamese) applied to both images, its
   descriptors L2-normalized per position;
2. **matching**: the correlation layer (:class:`learnreg.nn.correlation.FeatureCorrelation`)
   — every descriptor of one image against every descriptor of the other — followed by a
   ReLU and an L2 normalization across the correlation channels;
3. **regression**: ``conv 7×7 (128) → BN → ReLU → conv 5×5 (64) → BN → ReLU → FC`` (no
   padding) on the correlation volume, to the parameters of an affine transform (6 in 2D)
   or of a thin-plate spline on a 3×3 control grid (18);
4. **loss**: the *transformed grid loss* — the mean squared distance between a grid of points
   (20×20 in normalized coordinates ``[−1, 1]``) mapped by the predicted and by the true
   transform; fully supervised with synthetic random warps of real images
   (:class:`learnreg.data.random_warps.RandomWarpPairs`).

Conventions: the transform maps fixed to moving points (``ARCHITECTURE.md``); the correlation
volume is ``c(k, x)`` = ⟨moving feature at position ``k``, fixed feature at ``x``⟩, laid out
on the fixed feature grid. The network regresses in voxel index coordinates of its grid:
``transform="affine"``: :class:`learnreg.spatial.linear.Affine` parameters ``[L − I | t]``
about the grid centre ``Grid.index_center`` (:mod:`learnreg.data.random_warps`);
``transform="tps"``: displacements ``(K, D)`` (voxels) of the control grid
``Grid(shape).index_lattice(grid_size)``. :meth:`GeometricMatching.forward` returns the world
transform of the network grid: an :class:`~learnreg.spatial.affine.AffineTransform`
(``index_matrix_to_world``; saved as an ITK ``.mat``) or the thin-plate spline in the grid's
index frame (:meth:`learnreg.methods.tps_regression.TPSGrid.transform`). The grid loss is
taken in normalized coordinates (Rocco's), ``grid_error`` (mean distance, voxels) is reported
with it. ``extras``: ``"params"`` (``(N, D(D+1))`` or ``(N, K, D)``) and, for the affine,
``"matrix"`` (index coordinates).

Scaled down for CPUs (documented, configurable): Rocco's feature extractor is ImageNet-
pretrained VGG-16 up to ``pool4`` on 240×240 images (15×15×512 features); here a VGG-style
tower trained from scratch (no pretrained weights are shipped): conv 3×3 blocks of 16, 16, 32,
32, 64, 64 channels with batch norm and 2× max pooling after the 2nd, 4th and 6th, on 64×64
inputs (8×8×64 features, a 64-channel correlation volume); the regressor's convolutions are
64 (kernel 5) and 32 (kernel 3) channels, sized to the 8×8 volume. Works in 2D and 3D.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.losses import functional as LF
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.methods.tps_regression import TPSGrid
from learnreg.nn.blocks import conv_nd
from learnreg.nn.correlation import FeatureCorrelation
from learnreg.nn.regression import VGGEncoder
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.base import SpatialTransform, TransformChain
from learnreg.spatial.frame import index_matrix_to_world
from learnreg.spatial.linear import Affine

__all__ = [
    "TRANSFORMS",
    "STAGE_TRANSFORMS",
    "affine_matrix",
    "split_affine_tps",
    "matrix_to_affine_params",
    "GlobalTransformModel",
    "CorrelationRegressor",
    "GeometricMatching",
]

STAGE_TRANSFORMS = ("affine", "tps")
TRANSFORMS = (*STAGE_TRANSFORMS, "affine+tps")


def affine_matrix(params: Tensor, shape: Sequence[int]) -> Tensor:
    """Index-space homogeneous matrices ``(N, D+1, D+1)`` of :class:`~learnreg.spatial.linear.
    Affine` parameters ``(N, D(D+1))`` about the centre of a grid of ``shape``."""
    d = len(shape)
    if params.dim() != 2 or params.shape[1] != d * (d + 1):
        raise ValueError(
            f"affine parameters for a {d}D grid must be (N, {d * (d + 1)}); "
            f"got {tuple(params.shape)}"
        )
    c = torch.tensor(Grid(tuple(shape)).index_center, dtype=params.dtype, device=params.device)
    return Affine.from_params(params, center=c).homogeneous()


def split_affine_tps(params: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
    """Chained parameters ``(N, D(D+1) + K·D)`` (the affine's, then the TPS control
    displacements; the ``"affine+tps"`` warps of :mod:`learnreg.data.random_warps`) as the
    affine parameters ``(N, D(D+1))`` and control displacements ``(N, K, D)``."""
    a = ndim * (ndim + 1)
    if params.dim() != 2 or params.shape[1] <= a or (params.shape[1] - a) % ndim:
        raise ValueError(
            f"affine+tps parameters for {ndim}D must be (N, {a} + K*{ndim}); got "
            f"{tuple(params.shape)}"
        )
    return params[:, :a], params[:, a:].reshape(params.shape[0], -1, ndim)


def matrix_to_affine_params(matrix: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`affine_matrix`: ``[L − I | t]`` row-major with
    ``t = m − c + L c`` for ``M = [L | m]`` (differentiable)."""
    d = len(shape)
    if matrix.dim() != 3 or matrix.shape[1:] != (d + 1, d + 1):
        raise ValueError(
            f"matrices for a {d}D grid must be (N, {d + 1}, {d + 1}); got {tuple(matrix.shape)}"
        )
    lin, off = matrix[:, :d, :d], matrix[:, :d, d]
    c = torch.tensor(Grid(tuple(shape)).index_center, dtype=matrix.dtype, device=matrix.device)
    t = off - c + (lin @ c.unsqueeze(-1)).squeeze(-1)
    eye = torch.eye(d, dtype=matrix.dtype, device=matrix.device)
    return torch.cat([lin - eye, t.unsqueeze(-1)], -1).reshape(matrix.shape[0], -1)


class GlobalTransformModel(nn.Module):
    """An affine or a TPS transform on a fixed grid: parameters → transform, points, loss.

    Parameters are in voxel index coordinates of a grid of ``shape`` (:func:`affine_matrix`;
    TPS control displacements of ``Grid(shape).index_lattice(grid_size)``);
    :meth:`world_transform` places them on a network grid in world space.

    Args:
        shape: the network grid.
        transform: ``"affine"`` or ``"tps"``.
        grid_size: TPS control points per axis.
        loss_points: points per axis of the grid loss (Rocco: 20), from the first to the last
            voxel centre (``Grid.index_lattice``; Rocco's 20×20 grid in ``[−1, 1]²``).
    """

    def __init__(
        self,
        shape: Sequence[int],
        transform: str = "affine",
        grid_size: int | Sequence[int] = 3,
        loss_points: int = 20,
    ) -> None:
        super().__init__()
        check_option("transform", transform, STAGE_TRANSFORMS)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) not in (2, 3) or any(s < 2 for s in self.shape):
            raise ValueError(f"shape must be 2 or 3 sizes >= 2, got {tuple(shape)}")
        if int(loss_points) < 2:
            raise ValueError(f"loss grid needs >= 2 points per axis, got {loss_points}")
        self.ndim, self.transform = len(self.shape), transform
        d = self.ndim
        g = Grid(self.shape).index_lattice(int(loss_points), torch.float64)
        self.register_buffer("points", g.float(), persistent=False)
        half = torch.tensor([max(s - 1, 1) / 2 for s in self.shape])
        self.register_buffer("half_extent", half, persistent=False)
        if transform == "tps":
            self.tps = TPSGrid(self.shape, grid_size)
            self.register_buffer("point_basis", self.tps.basis(g).float(), persistent=False)
            self.param_shape: tuple[int, ...] = (self.tps.num_points, d)
        else:
            self.tps = None
            self.param_shape = (d * (d + 1),)

    @property
    def num_params(self) -> int:
        n = 1
        for s in self.param_shape:
            n *= s
        return n

    def check_params(self, params: Tensor, what: str = "params") -> Tensor:
        """``params`` reshaped to ``(N, *param_shape)`` (raises ValueError if impossible)."""
        n = params.shape[0] if params.dim() else 0
        if params.dim() < 2 or params[0].numel() != self.num_params:
            raise ValueError(
                f"{what} must be (N, {', '.join(map(str, self.param_shape))}) {self.transform} "
                f"parameters for a {self.shape} grid; got {tuple(params.shape)}"
            )
        return params.reshape(n, *self.param_shape)

    def world_transform(self, params: Tensor, grid: Grid | None = None) -> SpatialTransform:
        """The transform of ``params`` on the world points of ``grid`` (a grid of
        :attr:`shape`, default the unit grid): an :class:`~learnreg.spatial.affine.
        AffineTransform` ``G M G⁻¹`` or the thin-plate spline in ``grid``'s index frame."""
        p = self.check_params(params)
        grid = Grid(self.shape) if grid is None else grid
        if tuple(grid.shape) != self.shape:
            raise ValueError(f"{self.transform} parameters of a {self.shape} grid on {grid.shape}")
        if self.tps is None:
            return AffineTransform(index_matrix_to_world(affine_matrix(p, self.shape), grid))
        return self.tps.transform(p, grid)

    def dense(self, params: Tensor) -> Tensor:
        """Dense displacement ``(N, D, *S)`` in voxels (of the transform on any grid of
        :attr:`shape`)."""
        return self.world_transform(params).voxel_displacement(Grid(self.shape))

    def map_points(self, params: Tensor, points: Tensor | None = None) -> Tensor:
        """``T(points)`` ``(N, P, D)`` (index coordinates); default points: the loss grid.
        Other ``points`` (``(P, D)`` or ``(N, P, D)``, e.g. the loss grid mapped by another
        stage) only for the affine."""
        p = self.check_params(params)
        g = (self.points if points is None else points).to(p.dtype)
        if self.tps is None:
            m = affine_matrix(p, self.shape)
            d = self.ndim
            return g @ m[:, :d, :d].transpose(1, 2) + m[:, None, :d, d]
        if points is not None:
            raise ValueError("map_points: a TPS stage maps its own loss grid only")
        return g + self.point_basis.to(p.dtype) @ p

    def grid_errors(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean distance per pair ``(N,)`` between the loss grid mapped by ``pred`` and by
        ``target`` (voxels)."""
        a, b = self.map_points(pred), self.map_points(target.to(pred.dtype))
        return LF.grid_point_distance(a, b, reduction="none")

    def grid_loss(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Rocco's transformed-grid loss (mean squared distance in normalized coordinates) and
        ``grid_error`` (mean Euclidean distance in voxels, detached)."""
        a, b = self.map_points(pred), self.map_points(target.to(pred.dtype))
        sq = ((a - b) / self.half_extent.to(a.dtype)).square().sum(-1).mean()
        return {"grid_loss": sq, "grid_error": LF.grid_point_distance(a.detach(), b.detach())}


class CorrelationRegressor(nn.Module):
    """Rocco's regression network: ``[conv (no padding) → BN → ReLU]×k → flatten → FC``.

    Args:
        ndim: 2 or 3.
        in_channels: correlation channels (positions of the other feature map).
        in_shape: spatial size of the correlation volume.
        out_features: number of parameters.
        features, kernel_sizes: channels and kernel sizes of the convolutions (Rocco:
            ``(128, 64)``, ``(7, 5)``).
        norm: batch norm after each convolution (Rocco: yes).
        init_std: std of the final layer's initial weights (bias zero: starts near identity).
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        in_shape: Sequence[int],
        out_features: int,
        features: Sequence[int] = (128, 64),
        kernel_sizes: Sequence[int] = (7, 5),
        norm: bool = True,
        init_std: float = 1e-3,
    ) -> None:
        super().__init__()
        if len(features) != len(kernel_sizes):
            raise ValueError(
                f"features {tuple(features)} and kernel_sizes {tuple(kernel_sizes)} must have "
                "the same length"
            )
        size = [int(s) for s in in_shape]
        layers: list[nn.Module] = []
        prev = int(in_channels)
        bn = nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d
        for f, k in zip(features, kernel_sizes, strict=True):
            size = [s - int(k) + 1 for s in size]
            if any(s < 1 for s in size):
                raise ValueError(
                    f"regression kernels {tuple(kernel_sizes)} do not fit a correlation volume "
                    f"of size {tuple(in_shape)}"
                )
            layers += [conv_nd(ndim)(prev, int(f), int(k), bias=not norm)]
            layers += [bn(int(f)) if norm else nn.Identity(), nn.ReLU(inplace=True)]
            prev = int(f)
        self.convs = nn.Sequential(*layers)
        n = prev
        for s in size:
            n *= s
        self.fc = nn.Linear(n, int(out_features))
        nn.init.normal_(self.fc.weight, 0.0, init_std)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.convs(x).flatten(1))


@register_method(
    "geometric-matching",
    year=2017,
    ndim="2D/3D",
    transform="affine, thin-plate spline (3×3 control grid), or affine then TPS (chained)",
    loss="transformed grid loss (mean squared grid-point distance)",
    supervision="supervised (synthetic warps)",
    reference="Rocco, Arandjelović and Sivic, CVPR 2017",
    aliases=("rocco", "cnngeometric"),
)
class GeometricMatching(RegistrationMethod):
    """Geometric matching CNN: siamese features, correlation layer, affine/TPS regression.

    ``transform="affine+tps"`` is Rocco's chain (their Table 1 entry and their best model): an
    affine network, then a TPS network on the moving image warped by the affine, each with
    its own feature tower (:attr:`stages`, two ``GeometricMatching`` of the other two
    kinds). The TPS stage registers the fixed image to ``moving ∘ A``, so the chain maps a
    fixed point first through the spline, then through the affine: ``φ = A ∘ S``
    (``TransformChain([S, A])``), parameters ``[affine | TPS control displacements]``
    (:func:`split_affine_tps`). Rocco trains each stage on its own kind of random warps and
    chains them at test time: :meth:`chain` builds the chained model from two trained
    stages. Trained as one model (``affine+tps`` warps), its loss is the grid loss of the
    composed map; ``init:`` from an affine or TPS checkpoint fills that stage
    (:meth:`initial_state`).

    Args:
        ndim: 2 or 3.
        transform: ``"affine"``, ``"tps"`` or ``"affine+tps"`` (the chain).
        shape: input size (default 64×64, 40×48×40 in 3D): the regressor's FC layer fixes it.
        features, downsample_after: the siamese VGG-style tower (2× max pooling after the
            listed blocks).
        norm: of the tower (``"batch"``).
        coord_conv: CoordConv first layer of the tower (ablations).
        regression_features, regression_kernels: the regressor's convolutions.
        grid_size: TPS control points per axis (Rocco: 3 in 2D).
        loss_points: points per axis of the grid loss (Rocco: 20).
        linear_scale: the head regresses ``L − I`` in units of this.
        translation_scale: ... the translation in units of this many voxels (default
            ``max(shape) / 16``).
        displacement_scale: ... TPS control displacements in units of this many voxels
            (default ``max(shape) / 16``).
        normalize_correlation: ReLU + L2 normalization of the correlation volume (Rocco).
    """

    def __init__(
        self,
        ndim: int = 2,
        transform: str = "affine",
        shape: Sequence[int] | None = None,
        features: Sequence[int] = (16, 16, 32, 32, 64, 64),
        downsample_after: Sequence[int] = (1, 3, 5),
        norm: str | None = "batch",
        coord_conv: bool = False,
        regression_features: Sequence[int] = (64, 32),
        regression_kernels: Sequence[int] = (5, 3),
        grid_size: int | Sequence[int] = 3,
        loss_points: int = 20,
        linear_scale: float = 0.1,
        translation_scale: float | None = None,
        displacement_scale: float | None = None,
        normalize_correlation: bool = True,
    ) -> None:
        super().__init__()
        check_option("ndim", ndim, (2, 3))
        check_option("transform", transform, TRANSFORMS)
        shape = {2: (64, 64), 3: (40, 48, 40)}[ndim] if shape is None else shape
        self.stages: nn.ModuleDict | None = None
        self.model: GlobalTransformModel | None = None
        if transform == "affine+tps":
            kw = {
                "ndim": ndim,
                "shape": shape,
                "features": features,
                "downsample_after": downsample_after,
                "norm": norm,
                "coord_conv": coord_conv,
                "regression_features": regression_features,
                "regression_kernels": regression_kernels,
                "grid_size": grid_size,
                "loss_points": loss_points,
                "linear_scale": linear_scale,
                "translation_scale": translation_scale,
                "displacement_scale": displacement_scale,
                "normalize_correlation": normalize_correlation,
            }
            self.stages = nn.ModuleDict(
                {t: GeometricMatching(transform=t, **kw) for t in STAGE_TRANSFORMS}
            )
            first, second = self.stages["affine"], self.stages["tps"]
            self.shape, self.ndim, self.transform = first.shape, ndim, transform
            self.resolve(
                shape=self.shape,
                translation_scale=first.config["translation_scale"],
                displacement_scale=second.config["displacement_scale"],
                grid_size=second.config["grid_size"],
            )
            return
        self.model = GlobalTransformModel(shape, transform, grid_size, loss_points)
        if self.model.ndim != ndim:
            raise ValueError(f"shape {tuple(shape)} is not {ndim}D")
        self.shape, self.ndim, self.transform = self.model.shape, ndim, transform
        t_scale = max(self.shape) / 16 if translation_scale is None else float(translation_scale)
        d_scale = max(self.shape) / 16 if displacement_scale is None else float(displacement_scale)
        if not (linear_scale > 0 and t_scale > 0 and d_scale > 0):
            raise ValueError("linear_scale, translation_scale and displacement_scale must be > 0")
        self.resolve(
            shape=self.shape,
            translation_scale=t_scale,
            displacement_scale=d_scale,
            grid_size=self.model.tps.grid_size if self.model.tps is not None else grid_size,
        )
        if transform == "affine":
            unit = torch.full((ndim, ndim + 1), float(linear_scale))
            unit[:, ndim] = t_scale
            unit = unit.flatten()
        else:
            unit = torch.full((self.model.num_params,), d_scale)
        self.register_buffer("unit", unit, persistent=False)
        self.tower = VGGEncoder(
            ndim, 1, features, downsample_after, pooling="max", norm=norm, coord_conv=coord_conv
        )
        fshape = self.tower.output_shape(self.shape)
        if any(s < 1 for s in fshape):
            raise ValueError(f"input size {self.shape} is too small for the tower")
        npos = 1
        for s in fshape:
            npos *= s
        self.correlation = FeatureCorrelation(True, bool(normalize_correlation))
        self.regressor = CorrelationRegressor(
            ndim,
            npos,
            fshape,
            self.model.num_params,
            regression_features,
            regression_kernels,
            norm=norm is not None,
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        want = (1, *self.shape)
        if fixed.shape != moving.shape or fixed.dim() != self.ndim + 2 or fixed.shape[1:] != want:
            raise ValueError(
                f"{self.name or type(self).__name__}: fixed and moving must both be "
                f"(N, {', '.join(map(str, want))}) (shape); got {tuple(fixed.shape)} and "
                f"{tuple(moving.shape)}"
            )

    @classmethod
    def chain(cls, affine: GeometricMatching, tps: GeometricMatching) -> GeometricMatching:
        """Rocco's chain of two trained stages (same architecture settings): the affine
        network, then the TPS network on the affinely warped moving image."""
        if affine.transform != "affine" or tps.transform != "tps":
            raise ValueError(
                f"chain: need an affine then a tps stage, got {affine.transform!r} and "
                f"{tps.transform!r}"
            )
        config = {**affine.config, "transform": "affine+tps"}
        config["displacement_scale"] = tps.config["displacement_scale"]
        config["grid_size"] = tps.config["grid_size"]
        chained = cls(**config)
        for name, stage in (("affine", affine), ("tps", tps)):
            try:
                chained.stages[name].load_state_dict(stage.state_dict())
            except RuntimeError as e:
                raise ValueError(
                    f"chain: the {name} stage's architecture differs from the affine "
                    f"stage's settings ({str(e).splitlines()[0][:120]})"
                ) from None
        return chained

    def initial_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A chain starts from a checkpoint of one stage (an affine or a TPS model: its
        weights go to that stage, the other keeps its own) or of a chain."""
        if self.stages is None or any(k.startswith("stages.") for k in state):
            return state
        fc = state.get("regressor.fc.weight")
        d = self.ndim
        stage = "affine" if fc is not None and fc.shape[0] == d * (d + 1) else "tps"
        return {**self.state_dict(), **{f"stages.{stage}.{k}": v for k, v in state.items()}}

    def predict_params(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """Transform parameters ``(N, *param_shape)`` (voxel index units of the grid)."""
        self.check_pair(fixed, moving)
        f_fixed, f_moving = self.tower(torch.cat([fixed, moving], 0)).chunk(2, 0)
        corr = self.correlation(f_moving, f_fixed)
        raw = self.regressor(corr) * self.unit.to(fixed.dtype)
        return raw.view(fixed.shape[0], *self.model.param_shape)

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        grid = unit_grid(fixed) if grid is None else grid
        if self.stages is not None:
            first = self.stages["affine"](fixed, moving, grid)
            second = self.stages["tps"](fixed, first.warped, grid)  # fixed ≈ moving ∘ A ∘ S
            pa, pt = first.extras["params"], second.extras["params"]
            extras = {
                "params": torch.cat([pa, pt.flatten(1)], 1),
                "affine_params": pa,
                "tps_params": pt,
                "matrix": first.extras["matrix"],
                "warped_affine": first.warped,
            }
            chained = TransformChain([second.transform, first.transform])
            return MethodOutput(chained, grid, moving, extras)
        params = self.predict_params(fixed, moving)
        extras = {"params": params}
        if self.transform == "affine":
            extras["matrix"] = affine_matrix(params, self.shape)
        return MethodOutput(self.model.world_transform(params, grid), grid, moving, extras)

    def chain_points(self, params: Tensor) -> Tensor:
        """The chain's loss grid ``g`` mapped by ``A(S(g))`` ``(N, P, D)`` for chained
        parameters ``(N, D(D+1) + K·D)``."""
        assert self.stages is not None
        pa, pt = split_affine_tps(params, self.ndim)
        first, second = self.stages["affine"].model, self.stages["tps"].model
        return first.map_points(pa, second.map_points(second.check_params(pt, "tps params")))

    def target(self, batch: RegistrationBatch) -> Tensor:
        """``batch.target`` as ``(N, *param_shape)`` (raises if absent or malformed)."""
        if batch.target is None:
            raise ValueError(
                f"{self.name}: supervised; the batch needs target = the true {self.transform} "
                "parameters (e.g. learnreg.data.random_warps.RandomWarpPairs)"
            )
        if batch.target.shape[0] != batch.fixed.shape[0]:
            raise ValueError(
                f"{self.name}: target has {batch.target.shape[0]} items, the batch "
                f"{batch.fixed.shape[0]}"
            )
        if self.stages is not None:
            split_affine_tps(batch.target.flatten(1), self.ndim)  # raises if malformed
            return batch.target.flatten(1).to(batch.fixed.dtype)
        return self.model.check_params(batch.target, "target").to(batch.fixed.dtype)

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        if self.stages is None:
            terms = self.model.grid_loss(output.extras["params"], self.target(batch))
            return {"total": terms["grid_loss"], **terms}
        a = self.chain_points(output.extras["params"])
        b = self.chain_points(self.target(batch))
        half = self.stages["affine"].model.half_extent.to(a.dtype)
        sq = ((a - b) / half).square().sum(-1).mean()
        error = LF.grid_point_distance(a.detach(), b.detach())
        return {"total": sq, "grid_loss": sq, "grid_error": error}

    def transform_error(self, batch: RegistrationBatch, output: MethodOutput) -> Tensor:
        """Rocco's grid error per pair ``(N,)``: mean distance of the loss grid mapped by the
        predicted and the true transform, voxels of the network grid."""
        if self.stages is not None:
            a = self.chain_points(output.extras["params"])
            b = self.chain_points(self.target(batch))
            return LF.grid_point_distance(a, b, reduction="none")
        return self.model.grid_errors(output.extras["params"], self.target(batch))
