"""Thin-plate-spline regression: a ConvNet regresses the displacements of a TPS control grid.

Eppenhof, Lafarge, Moeskops, Veta and Pluim, "Deformable image registration using
convolutional neural networks", SPIE Medical Imaging 2018: a 3D ConvNet sees the fixed and
moving volumes stacked as two channels and outputs the displacements of a coarse regular grid
of control points; a thin-plate spline through them is the dense transform. It is trained,
supervised, on synthetic deformations of real volumes (random control-point displacements,
:class:`learnreg.data.random_warps.RandomWarpPairs` with ``kind="tps"``), with the transform
error as loss: the mean squared error between predicted and true control-point displacements
(``loss="control"``, default) or of the dense displacement fields (``loss="dense"``).

Conventions: control points ``Grid(shape).index_lattice(grid_size)`` — ``grid_size`` per
axis, from the first to the last voxel centre of the network grid, index coordinates — and
their displacements ``δ`` ``(N, K, D)`` in voxels, fixed → moving: ``T(p_k) = p_k + δ_k``. The
transform :meth:`TPSRegression.forward` returns is that thin-plate spline
(:class:`learnreg.spatial.tps.ThinPlateSpline` through ``p_k ↦ p_k + δ_k``) in the index frame
of the network grid (:class:`~learnreg.spatial.frame.GridFrame`), so it maps any world point;
its dense displacement on the network grid is the TPS interpolation :func:`tps_basis` ``@ δ``
(the spline is linear in the values it interpolates, so one fixed matrix maps ``δ`` to the
field — the same spline, computed fast: :class:`ControlGridSpline`). ``extras["control"]`` is
``δ``.

Network: a compact VGG-style two-channel encoder (:class:`learnreg.nn.regression.VGGEncoder`)
whose features are average-pooled onto the control grid and convolved to the ``D``
displacement components of each control point (``head="conv"``, default: the network's output
is the control grid, each point predicted from the image content around it), or flattened into
fully connected layers (``head="fc"``, :class:`learnreg.nn.regression.ParameterRegressor`).
Scaled down for CPUs (documented, configurable): conv 3×3 blocks of 8, 16, 16, 32, 32, 64
channels with batch norm and max pooling after the 2nd and 4th, on 40×48×40 volumes (LPBA40
at 4 mm), 6×6×6 control points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.losses import functional as LF
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.blocks import conv_nd
from learnreg.nn.regression import ParameterRegressor, VGGEncoder
from learnreg.spatial.frame import GridFrame
from learnreg.spatial.tps import ThinPlateSpline, tps_kernel

__all__ = [
    "tps_inverse",
    "tps_design",
    "tps_basis",
    "control_point_error",
    "TPSGrid",
    "ControlGridSpline",
    "TPSRegression",
]

LOSSES = ("control", "dense")
HEADS = ("conv", "fc")


def _shape(shape: Sequence[int], ndim: int | None = None) -> tuple[int, ...]:
    s = tuple(int(v) for v in shape)
    if len(s) not in (2, 3) or any(v < 2 for v in s) or (ndim is not None and len(s) != ndim):
        want = f"{ndim}" if ndim is not None else "2 or 3"
        raise ValueError(f"shape must be {want} sizes >= 2, got {tuple(shape)}")
    return s


def _grid_size(grid_size: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    g = (int(grid_size),) * ndim if isinstance(grid_size, int) else tuple(int(v) for v in grid_size)
    if len(g) != ndim or any(v < 2 for v in g):
        raise ValueError(f"grid_size must be an int or {ndim} ints >= 2, got {grid_size!r}")
    return g


def tps_inverse(control: Tensor) -> Tensor:
    """The first ``K`` columns ``(K + D + 1, K)`` of the inverse of the TPS system
    ``Λ = [[U(|p_j − p_k|), 1, p_j], [1ᵀ; pᵀ, 0]]`` of control points ``(K, D)`` (float64):
    the spline through values ``v`` ``(K, ...)`` has coefficients ``[w; a] = Λ⁻¹[:, :K] v``."""
    if control.dim() != 2 or control.shape[1] not in (2, 3):
        raise ValueError(
            f"control points must be (K, D) with D in (2, 3); got {tuple(control.shape)}"
        )
    k, d = control.shape
    if k < d + 1:
        raise ValueError(f"a thin-plate spline needs K >= D + 1 = {d + 1} points, got {k}")
    p = control.double()
    kern = tps_kernel((p[:, None] - p[None]).square().sum(-1), d)
    poly = torch.cat([torch.ones_like(p[:, :1]), p], 1)
    zeros = torch.zeros(d + 1, d + 1, dtype=p.dtype, device=p.device)
    system = torch.cat([torch.cat([kern, poly], 1), torch.cat([poly.T, zeros], 1)])
    return torch.linalg.inv(system)[:, :k]


def tps_design(control: Tensor, points: Tensor, chunk: int = 4096) -> Tensor:
    """``[U(|x − p_k|) | 1 | x]`` ``(P, K + D + 1)`` (float64) of ``points`` ``(P, D)`` and
    control points ``(K, D)``: the spline's values at ``points`` are ``design @ [w; a]``."""
    if control.dim() != 2 or points.dim() != 2 or control.shape[1] != points.shape[1]:
        raise ValueError(
            f"tps_design: expected control (K, D) and points (P, D); got {tuple(control.shape)}"
            f" and {tuple(points.shape)}"
        )
    p = control.double()
    x = points.double().to(p.device)
    d = p.shape[1]
    rows = []
    for xs in x.split(chunk):
        r2 = (xs.square().sum(1, keepdim=True) - 2 * xs @ p.T + p.square().sum(1)).clamp_min(0)
        u = tps_kernel(r2, d)
        rows.append(torch.cat([u, torch.ones_like(xs[:, :1]), xs], 1))
    return torch.cat(rows)


def tps_basis(control: Tensor, points: Tensor) -> Tensor:
    """Thin-plate-spline interpolation matrix ``B`` ``(P, K)`` (float64): for values ``v``
    ``(K, ...)`` at control points ``control`` ``(K, D)``, the interpolating spline at
    ``points`` ``(P, D)`` is ``B @ v`` (``B = tps_design · tps_inverse``; kernel
    :func:`learnreg.spatial.tps.tps_kernel`). Rows sum to one; affine maps are reproduced."""
    return tps_design(control, points) @ tps_inverse(control)


def control_point_error(predicted: Tensor, target: Tensor) -> Tensor:
    """Mean Euclidean distance per pair ``(N,)`` between control-point displacements
    ``(N, K, D)`` (their units, voxels)."""
    if predicted.shape != target.shape or predicted.dim() != 3:
        raise ValueError(
            f"control_point_error: expected two (N, K, D) tensors, got {tuple(predicted.shape)}"
            f" and {tuple(target.shape)}"
        )
    return (predicted - target).norm(dim=-1).mean(-1)


class TPSGrid(torch.nn.Module):
    """Dense fields and point maps of TPS control-grid displacements on a fixed grid.

    Control points: ``Grid(shape).index_lattice(grid_size)`` (:attr:`control`, ``(K, D)``).
    The design matrix of the grid's voxels (:func:`tps_design`, ``(prod(S), K + D + 1)``,
    float32) is computed once; a dense field is then two small matrix products.
    """

    def __init__(self, shape: Sequence[int], grid_size: int | Sequence[int]) -> None:
        super().__init__()
        self.shape = _shape(shape)
        self.ndim = len(self.shape)
        self.grid_size = _grid_size(grid_size, self.ndim)
        grid = Grid(self.shape)
        cp = grid.index_lattice(self.grid_size, torch.float64)
        self.num_points = cp.shape[0]
        self.register_buffer("control", cp.float(), persistent=False)
        self.register_buffer("inverse", tps_inverse(cp).float(), persistent=False)
        pts = grid.index_points(torch.float64).reshape(-1, self.ndim)
        self.register_buffer("design", tps_design(cp, pts).float(), persistent=False)

    def check(self, delta: Tensor, what: str = "control displacements") -> Tensor:
        """``delta`` as ``(N, K, D)`` (raises ValueError if it is not)."""
        k, d = self.num_points, self.ndim
        if delta.dim() != 3 or tuple(delta.shape[1:]) != (k, d):
            raise ValueError(
                f"{what} must be (N, {k}, {d}) for a {'×'.join(map(str, self.grid_size))} "
                f"control grid; got {tuple(delta.shape)}"
            )
        return delta

    def dense(self, delta: Tensor) -> Tensor:
        """Dense displacement ``(N, D, *S)`` (voxels) of control displacements ``(N, K, D)``."""
        n = self.check(delta).shape[0]
        v = delta.transpose(0, 1).reshape(self.num_points, n * self.ndim)  # (K, N·D)
        u = self.design.to(delta.dtype) @ (self.inverse.to(delta.dtype) @ v)  # (P, N·D)
        return u.reshape(*self.shape, n, self.ndim).movedim(-2, 0).movedim(-1, 1).contiguous()

    def basis(self, points: Tensor) -> Tensor:
        """:func:`tps_basis` of this control grid at ``points`` ``(P, D)``."""
        return tps_basis(self.control, points).to(points.dtype)

    def spline(self, delta: Tensor) -> ControlGridSpline:
        """The thin-plate spline of index points through ``p_k ↦ p_k + δ_k``."""
        return ControlGridSpline(self, delta)

    def transform(self, delta: Tensor, grid: Grid | None = None) -> GridFrame:
        """The spline of ``delta`` on the world points of ``grid`` (a network grid of
        :attr:`shape`; default the unit grid): ``x ↦ G(T(G⁻¹ x))``."""
        grid = Grid(self.shape) if grid is None else grid
        if tuple(grid.shape) != self.shape:
            raise ValueError(f"TPSGrid: a {self.shape} control grid on a {grid.shape} grid")
        return GridFrame(self.spline(delta), grid)


class ControlGridSpline(ThinPlateSpline):
    """:class:`~learnreg.spatial.tps.ThinPlateSpline` through the control grid of a
    :class:`TPSGrid` displaced by ``delta`` ``(N, K, D)``, of index points of that grid.

    Points map exactly as ``ThinPlateSpline`` maps them; the displacement on the unit grid of
    the control grid's shape is the same spline through the precomputed design matrix
    (:meth:`TPSGrid.dense`, differentiable and far cheaper than evaluating the kernel)."""

    def __init__(self, tps: TPSGrid, delta: Tensor) -> None:
        delta = tps.check(delta)
        cp = tps.control.to(delta.dtype)
        super().__init__(cp, cp[None] + delta)
        self.delta = delta
        object.__setattr__(self, "_tps", tps)  # not a submodule: its buffers are no batch

    @property
    def batch_size(self) -> int:
        return int(self.delta.shape[0])

    def voxel_displacement(self, grid: Grid, batch: int | None = None) -> Tensor:
        tps: TPSGrid = self._tps
        if grid.allclose(Grid(tps.shape)) and batch in (None, self.batch_size):
            return tps.dense(self.delta)
        return super().voxel_displacement(grid, batch)


@register_method(
    "tps-regression",
    year=2018,
    ndim="2D/3D",
    transform="thin-plate spline (control-grid displacements)",
    loss="MSE of control-point (or dense) displacements",
    supervision="supervised (synthetic deformations)",
    reference="Eppenhof et al., SPIE Medical Imaging 2018",
    aliases=("eppenhof", "tps-net"),
)
class TPSRegression(RegistrationMethod):
    """TPS regression ConvNet: two-channel VGG encoder → control-grid displacements → TPS.

    Args:
        ndim: 2 or 3.
        shape: input size (default 40×48×40 in 3D, 64×64 in 2D); the FC head fixes it.
        grid_size: control points per axis (default 6, i.e. 6×6×6 in 3D).
        features: channels of the conv blocks (VGG-style ``conv 3×3 → BN → ReLU``).
        downsample_after: 0-based blocks followed by 2× max pooling.
        head: ``"conv"`` — the encoder's features averaged onto the control grid (adaptive
            average pooling, each control point reads the features around it) and a 3×3
            convolution to ``D`` displacement channels (fully convolutional, the output *is*
            the control grid); ``"fc"`` — flatten and fully connected layers
            (:class:`~learnreg.nn.regression.ParameterRegressor`).
        hidden, dropout: fully connected layers of the ``"fc"`` head.
        norm, pooling, coord_conv: of the encoder (:class:`~learnreg.nn.regression.
            VGGEncoder`).
        displacement_scale: the network regresses ``δ`` in units of this many voxels.
        loss: ``"control"`` (MSE of control displacements) or ``"dense"`` (MSE of the dense
            displacement fields), voxels².
    """

    def __init__(
        self,
        ndim: int = 3,
        shape: Sequence[int] | None = None,
        grid_size: int | Sequence[int] = 6,
        features: Sequence[int] = (8, 16, 16, 32, 32, 64),
        downsample_after: Sequence[int] = (1, 3),
        head: str = "conv",
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
        norm: str | None = "batch",
        pooling: str = "max",
        coord_conv: bool = False,
        displacement_scale: float = 2.0,
        loss: str = "control",
    ) -> None:
        super().__init__()
        check_option("ndim", ndim, (2, 3))
        check_option("loss", loss, LOSSES)
        check_option("head", head, HEADS)
        if not displacement_scale > 0:
            raise ValueError(f"displacement_scale must be > 0, got {displacement_scale}")
        shape = {2: (64, 64), 3: (40, 48, 40)}[ndim] if shape is None else shape
        self.tps = TPSGrid(_shape(shape, ndim), grid_size)
        self.shape, self.ndim, self.head = self.tps.shape, ndim, head
        self.displacement_scale, self.loss_kind = float(displacement_scale), loss
        self.resolve(shape=self.shape, grid_size=self.tps.grid_size)
        enc = {
            "features": tuple(features),
            "downsample_after": tuple(downsample_after),
            "pooling": pooling,
            "norm": norm,
            "coord_conv": coord_conv,
        }
        if head == "fc":
            fc = {"hidden": tuple(hidden), "dropout": dropout, "init_std": 1e-3}
            self.net = ParameterRegressor(
                ndim, self.shape, self.tps.num_points * ndim, {"mode": "two-channel", **enc}, fc
            )
        else:
            self.net = _ConvControlHead(ndim, self.tps.grid_size, enc)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        want = (1, *self.shape)
        if fixed.shape != moving.shape or fixed.dim() != self.ndim + 2 or fixed.shape[1:] != want:
            raise ValueError(
                f"{self.name}: fixed and moving must both be (N, {', '.join(map(str, want))})"
                f" (shape); got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )

    def predict_control(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """Control-point displacements ``(N, K, D)`` in voxels."""
        self.check_pair(fixed, moving)
        n = fixed.shape[0]
        raw = self.net(fixed, moving).reshape(n, self.tps.num_points, self.ndim)
        return raw * self.displacement_scale

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        grid = unit_grid(fixed) if grid is None else grid
        delta = self.predict_control(fixed, moving)
        return MethodOutput(self.tps.transform(delta, grid), grid, moving, {"control": delta})

    def target(self, batch: RegistrationBatch) -> Tensor:
        """``batch.target`` as ``(N, K, D)`` control displacements (raises if absent/bad)."""
        t, n = batch.target, batch.fixed.shape[0]
        k, d = self.tps.num_points, self.ndim
        if t is None:
            raise ValueError(
                f"{self.name}: supervised; the batch needs target = the (N, {k}, {d}) control-"
                "point displacements (e.g. learnreg.data.random_warps.RandomWarpPairs, kind='tps')"
            )
        if t.shape not in ((n, k, d), (n, k * d)):
            raise ValueError(
                f"{self.name}: target must be (N, {k}, {d}) control displacements with N = {n};"
                f" got {tuple(t.shape)}"
            )
        return t.reshape(n, k, d).to(batch.fixed.dtype)

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        target = self.target(batch)
        pred = output.extras["control"]
        if self.loss_kind == "control":
            mse = LF.parameter_mse(pred, target)
        else:
            mse = (output.displacement - self.tps.dense(target)).square().mean()
        with torch.no_grad():
            err = control_point_error(pred, target).mean()
        return {"total": mse, "mse": mse, "control_point_error": err}

    def transform_error(self, batch: RegistrationBatch, output: MethodOutput) -> Tensor:
        """Mean control-point distance per pair ``(N,)``, voxels of the network grid."""
        return control_point_error(output.extras["control"], self.target(batch))


class _ConvControlHead(torch.nn.Module):
    """Two-channel VGG encoder → adaptive average pooling onto the control grid → conv 3×3
    to ``D`` channels; output ``(N, K, D)`` in control-point order (last axis fastest)."""

    def __init__(self, ndim: int, grid_size: Sequence[int], encoder: dict) -> None:
        super().__init__()
        self.encoder = VGGEncoder(ndim, 2, **encoder)
        pool = torch.nn.AdaptiveAvgPool2d if ndim == 2 else torch.nn.AdaptiveAvgPool3d
        self.pool = pool(tuple(grid_size))
        self.out = conv_nd(ndim)(self.encoder.out_channels, ndim, 3, padding=1)
        torch.nn.init.normal_(self.out.weight, 0.0, 1e-3)
        torch.nn.init.zeros_(self.out.bias)
        self.ndim = ndim

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        x = self.out(self.pool(self.encoder(torch.cat([fixed, moving], 1))))
        return x.flatten(2).transpose(1, 2)  # (N, K, D)
