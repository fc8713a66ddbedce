"""DLIR: unsupervised affine then multi-stage B-spline registration networks.

de Vos, Berendsen, Viergever, Sokooti, Staring and Išgum, "A deep learning framework for
unsupervised affine and deformable image registration", Medical Image Analysis 52, 2019.

* **Affine stage**: a pseudo-siamese ConvNet — two pipelines *without* shared weights, one for
  the fixed and one for the moving image, each alternating ``conv 3 → [BN] → activation``
  layers with 2× average pooling — whose outputs are globally average pooled, concatenated and
  mapped by fully connected layers to 12 (3D; 6 in 2D) affine parameters, decomposed as in the
  paper into translation, rotation, scaling and shearing.
* **B-spline stages**: per stage a "patch-based" ConvNet on the channel-stacked fixed image
  and moving image *as warped by all earlier stages*; ``log2(s)`` average poolings bring its
  features to the resolution of a cubic B-spline control lattice of spacing ``s`` voxels;
  1×1 convolutions (the paper's fully connected layers applied patch-wise) regress the
  control-point displacements. Stages use decreasing spacings (coarse to fine).
* **Loss**: negative NCC of each stage's warped moving image with the fixed image, plus
  ``bending_weight`` × the bending energy of each B-spline stage's dense field; no labels,
  no ground truth. As in the paper, stages are trained one after the other
  (:meth:`DLIR.set_trainable_stages`): earlier stages are frozen (and their batch-norm
  statistics too), later ones are skipped while training.

Transforms compose: stage ``k`` (spacing ``s_k``, field ``v_k``) sees ``moving ∘ φ_{k−1}`` and
the map becomes ``φ_k = φ_{k−1} ∘ (id + v_k)``, with ``φ_0 = A`` the affine map; ``moving`` is
resampled once through ``φ_k`` (no interpolation build-up). Everything is in voxel index
coordinates of the network grid, the affine about the grid centre (:mod:`learnreg.data.
perturb` conventions), fixed → moving.

Scaled down for CPUs (documented, configurable): 16 kernels per layer (paper: 32), one hidden
fully connected layer of 64 units, LeakyReLU(0.2) instead of ELU (the shared
:class:`~learnreg.nn.blocks.ConvBlock`), spacings 8 and 4 voxels on a 4 mm grid (32 mm and
16 mm). On LPBA40 at 8 mm, Adam with 3e-3 for the affine stage and 1e-3 for a B-spline
stage trained reliably; a B-spline stage at 3e-3 overshot.

``extras``: ``"affine"`` (index-space matrices ``(N, D+1, D+1)``), ``"affine_params"``
(translation in half-extents, rotation, log-scale, shear), ``"stage_warped"`` ``(N, K+1, *S)``
(the moving image after each stage), ``"bspline_fields"`` ``(N, K, D, *S)`` and
``"coefficients_k"`` (control-point displacements of B-spline stage ``k``, 1-based).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnreg.losses import functional as LF
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod
from learnreg.methods.registry import register_method
from learnreg.nn.blocks import ConvBlock, conv_nd
from learnreg.nn.regression import PairEncoder, RegressionHead, VGGEncoder
from learnreg.spatial.bspline import control_lattice_shape, evaluate_bspline
from learnreg.spatial.linear import rotation_matrix
from learnreg.spatial.sampling import warp

__all__ = [
    "SIMILARITIES",
    "index_grid",
    "affine_displacement",
    "decomposed_affine",
    "AffineNet",
    "BSplineNet",
    "DLIR",
]

SIMILARITIES = ("ncc", "lncc")


def _check_choice(name: str, value: object, valid: Sequence[object]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {tuple(valid)}, got {value!r}")


# ---------------------------------------------------------------------------- helpers
def index_grid(shape: Sequence[int], dtype=torch.float32, device=None) -> Tensor:
    """Index coordinates of every voxel of a grid of ``shape``, channels-last ``(*S, D)``."""
    axes = [torch.arange(int(s), dtype=dtype, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


def affine_displacement(matrix: Tensor, shape: Sequence[int]) -> Tensor:
    """Displacement ``M x − x`` ``(N, D, *S)`` in voxels of index-space homogeneous matrices
    ``(N, D+1, D+1)`` on a grid of ``shape`` (differentiable)."""
    d = len(shape)
    if matrix.dim() != 3 or matrix.shape[1:] != (d + 1, d + 1):
        raise ValueError(
            f"affine_displacement: matrices for a {d}D grid must be (N, {d + 1}, {d + 1}); "
            f"got {tuple(matrix.shape)}"
        )
    pts = index_grid(shape, matrix.dtype, matrix.device)
    eye = torch.eye(d, dtype=matrix.dtype, device=matrix.device)
    disp = torch.einsum("nij,...j->n...i", matrix[:, :d, :d] - eye, pts)
    disp = disp + matrix[:, :d, d].reshape(-1, *([1] * d), d)
    return disp.movedim(-1, 1)


def decomposed_affine(
    translation: Tensor, rotation: Tensor, log_scale: Tensor, shear: Tensor, center: Tensor
) -> Tensor:
    """Homogeneous matrices ``(N, D+1, D+1)`` of ``x ↦ R·Sh·diag(exp(log_scale))·(x − c) + c + t``.

    ``translation`` ``(N, D)``, ``rotation`` ``(N, 1)`` (2D angle) or ``(N, 3)`` (rotation
    vector), ``log_scale`` ``(N, D)``, ``shear`` ``(N, D(D−1)/2)`` (upper triangle, row-major),
    ``center`` ``(D,)``; all zeros is the identity.
    """
    n, d = translation.shape
    if (
        d not in (2, 3)
        or rotation.shape != (n, d * (d - 1) // 2)
        or log_scale.shape != (n, d)
        or shear.shape != (n, d * (d - 1) // 2)
        or center.shape != (d,)
    ):
        raise ValueError(
            f"decomposed_affine: inconsistent shapes translation {tuple(translation.shape)}, "
            f"rotation {tuple(rotation.shape)}, log_scale {tuple(log_scale.shape)}, shear "
            f"{tuple(shear.shape)}, center {tuple(center.shape)}"
        )
    iu = torch.triu_indices(d, d, 1, device=shear.device)
    sh = torch.eye(d, dtype=shear.dtype, device=shear.device).repeat(n, 1, 1)
    sh = sh.index_put((torch.arange(n, device=shear.device)[:, None], iu[0], iu[1]), shear)
    lin = rotation_matrix(rotation) @ sh @ torch.diag_embed(log_scale.exp())
    c = center.to(lin.dtype)
    offset = translation + c - lin @ c
    top = torch.cat([lin, offset.unsqueeze(-1)], -1)
    bottom = torch.zeros(n, 1, d + 1, dtype=lin.dtype, device=lin.device)
    bottom[..., d] = 1
    return torch.cat([top, bottom], 1)


def _sample_control_points(features: Tensor, shape: Sequence[int], spacing: int) -> Tensor:
    """Features ``(N, C, *F)`` pooled by ``spacing`` from a grid of ``shape``, sampled
    (linearly, border-extended) at the control points of a B-spline lattice of that spacing:
    control point ``k`` sits at voxel ``(k − 1) s``; feature cell ``j`` is centred at voxel
    ``j s + (s − 1) / 2``."""
    d = len(shape)
    cshape = control_lattice_shape(shape, [spacing] * d)
    coords = []
    for axis in range(d):
        nf = features.shape[axis + 2]
        vox = (torch.arange(cshape[axis], dtype=features.dtype, device=features.device) - 1) * (
            spacing
        )
        f = (vox - (spacing - 1) / 2) / spacing
        coords.append(2 * f / (nf - 1) - 1 if nf > 1 else torch.zeros_like(f))
    mesh = torch.stack(torch.meshgrid(*coords, indexing="ij"), -1).flip(-1)  # grid_sample x,y,z
    mesh = mesh.unsqueeze(0).expand(features.shape[0], *mesh.shape)
    return F.grid_sample(features, mesh, mode="bilinear", padding_mode="border", align_corners=True)


# ---------------------------------------------------------------------------- networks
class AffineNet(nn.Module):
    """DLIR's affine ConvNet: pseudo-siamese pipelines → global average pooling → FC → 12 (6)
    decomposed affine parameters ``[t, ω, log s, shear]``.

    Args:
        ndim: 2 or 3.
        features: kernels per conv layer (paper 32).
        layers: conv layers per pipeline (paper 5).
        downsamplings: average poolings (after the first ``downsamplings`` layers).
        hidden: widths of the fully connected layers before the output.
        norm: normalization of the conv layers (paper: batch normalization).
        coord_conv: CoordConv first layer (Liu et al. 2018).
    """

    def __init__(
        self,
        ndim: int,
        features: int = 16,
        layers: int = 5,
        downsamplings: int = 4,
        hidden: Sequence[int] = (64,),
        norm: str | None = "batch",
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        if layers < 1 or not 0 <= downsamplings <= layers:
            raise ValueError(
                f"AffineNet: need layers >= 1 and 0 <= downsamplings <= layers, got "
                f"{layers} and {downsamplings}"
            )
        self.ndim, self.downsamplings = ndim, int(downsamplings)
        self.encoder = PairEncoder(
            ndim,
            "pseudo-siamese",
            1,
            [int(features)] * layers,
            tuple(range(downsamplings)),
            pooling="avg",
            norm=norm,
            coord_conv=coord_conv,
            negative_slope=0.2,
        )
        nrot = ndim * (ndim - 1) // 2
        self.sizes = (ndim, nrot, ndim, nrot)  # translation, rotation, log-scale, shear
        self.head = RegressionHead(
            self.encoder.out_channels, sum(self.sizes), hidden, dropout=0.0, init_std=0.0
        )

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """Parameters ``(N, P)``; zeros are the identity."""
        x = self.encoder(fixed, moving)
        return self.head(x.flatten(2).mean(2))  # global average pooling per pipeline channel

    def matrix(self, params: Tensor, shape: Sequence[int]) -> Tensor:
        """Index-space matrices ``(N, D+1, D+1)`` about the centre of a grid of ``shape``;
        translations are in half-extents of the grid, ``(S − 1) / 2`` voxels per axis."""
        t, w, s, sh = params.split(self.sizes, 1)
        half = torch.tensor([(n - 1) / 2 for n in shape], dtype=params.dtype, device=params.device)
        return decomposed_affine(t * half, w, s, sh, half)


class BSplineNet(nn.Module):
    """DLIR's B-spline ConvNet for control spacing ``spacing`` (a power of two, voxels).

    ``conv 3 → [norm] → activation`` layers on the channel-stacked pair with an average
    pooling after each of the first ``log2(spacing)``, then ``dense`` 1×1 conv layers and a
    zero-initialized 1×1 conv to ``ndim`` control-point displacements (voxels).
    """

    def __init__(
        self,
        ndim: int,
        spacing: int,
        features: int = 16,
        layers: int = 5,
        dense: int = 2,
        norm: str | None = "batch",
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        k = math.log2(spacing) if spacing >= 1 else -1.0
        if k != int(k) or k < 1:
            raise ValueError(f"B-spline spacing must be a power of two >= 2, got {spacing}")
        if layers < int(k):
            raise ValueError(
                f"BSplineNet: {layers} conv layers cannot pool {int(k)} times (spacing {spacing})"
            )
        self.ndim, self.spacing = ndim, int(spacing)
        f = int(features)
        self.encoder = VGGEncoder(
            ndim,
            2,
            [f] * layers,
            tuple(range(int(k))),
            "avg",
            norm,
            coord_conv=coord_conv,
            negative_slope=0.2,
        )
        self.dense = nn.Sequential(
            *[ConvBlock(ndim, f, f, kernel_size=1, norm=norm) for _ in range(dense)]
        )
        self.out = conv_nd(ndim)(f, ndim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """Control-point displacements ``(N, D, *C)`` of the lattice covering the input grid."""
        shape = tuple(fixed.shape[2:])
        if any(s < self.spacing for s in shape):
            raise ValueError(
                f"BSplineNet: images {shape} are smaller than the control spacing {self.spacing}"
            )
        x = self.encoder(torch.cat([fixed, moving], 1))
        x = _sample_control_points(x, shape, self.spacing)
        return self.out(self.dense(x))


# ---------------------------------------------------------------------------- method
@register_method(
    "dlir",
    year=2019,
    ndim="2D/3D",
    transform="affine + multi-stage B-spline",
    loss="NCC + bending energy",
    supervision="unsupervised",
    reference="de Vos et al., Medical Image Analysis 2019",
    aliases=("de-vos",),
)
class DLIR(RegistrationMethod):
    """DLIR: affine ConvNet then coarse-to-fine B-spline ConvNets, trained with NCC.

    Args:
        ndim: 2 or 3.
        bspline_spacings: control spacing (voxels, powers of two, usually decreasing) of each
            B-spline stage; ``()`` gives the affine network alone.
        affine_features, affine_layers, affine_downsamplings, affine_hidden: :class:`AffineNet`.
        bspline_features, bspline_layers, bspline_dense: :class:`BSplineNet`.
        norm: conv normalization of every network (paper: ``"batch"``).
        coord_conv: CoordConv first layer in every network (Liu et al. 2018).
        similarity: ``"ncc"`` (global NCC, the paper's) or ``"lncc"`` (``window`` voxels).
        window: LNCC window (odd).
        bending_weight: weight of the bending energy of each B-spline stage's dense field
            (voxel units).
        trainable_stages: stages trained (0 = affine, ``k`` = B-spline stage ``k``); default
            all. See :meth:`set_trainable_stages`.
    """

    def __init__(
        self,
        ndim: int = 3,
        bspline_spacings: Sequence[int] = (8, 4),
        affine_features: int = 16,
        affine_layers: int = 5,
        affine_downsamplings: int = 4,
        affine_hidden: Sequence[int] = (64,),
        bspline_features: int = 16,
        bspline_layers: int = 5,
        bspline_dense: int = 2,
        norm: str | None = "batch",
        coord_conv: bool = False,
        similarity: str = "ncc",
        window: int = 9,
        bending_weight: float = 1.0,
        trainable_stages: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_choice("ndim", ndim, (2, 3))
        _check_choice("similarity", similarity, SIMILARITIES)
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be an odd positive int, got {window}")
        if not math.isfinite(bending_weight) or bending_weight < 0:
            raise ValueError(f"bending_weight must be >= 0, got {bending_weight}")
        self.ndim = ndim
        self.spacings = tuple(int(s) for s in bspline_spacings)
        self.similarity, self.window = similarity, int(window)
        self.bending_weight = float(bending_weight)
        self.affine_net = AffineNet(
            ndim,
            affine_features,
            affine_layers,
            affine_downsamplings,
            affine_hidden,
            norm,
            coord_conv,
        )
        self.bspline_nets = nn.ModuleList(
            BSplineNet(ndim, s, bspline_features, bspline_layers, bspline_dense, norm, coord_conv)
            for s in self.spacings
        )
        self.set_trainable_stages(
            range(self.stages) if trainable_stages is None else trainable_stages
        )

    @property
    def stages(self) -> int:
        """Number of stages: the affine one and the B-spline ones."""
        return 1 + len(self.spacings)

    def _stage(self, k: int) -> nn.Module:
        return self.affine_net if k == 0 else self.bspline_nets[k - 1]

    def set_trainable_stages(self, stages: Iterable[int]) -> None:
        """Train only ``stages`` (0 = affine); the others keep their weights and run in eval
        mode. While training, stages after the last trainable one are skipped."""
        chosen = tuple(sorted({int(k) for k in stages}))
        if not chosen or any(not 0 <= k < self.stages for k in chosen):
            raise ValueError(f"trainable stages must be a non-empty subset of 0..{self.stages - 1}")
        self.trainable_stages = chosen
        for k in range(self.stages):
            self._stage(k).requires_grad_(k in chosen)
        self.train(self.training)

    def train(self, mode: bool = True) -> DLIR:
        super().train(mode)
        for k in range(self.stages):
            if k not in getattr(self, "trainable_stages", range(self.stages)):
                self._stage(k).eval()
        return self

    @property
    def min_size(self) -> int:
        """Smallest image size per axis: the affine poolings and the largest control spacing."""
        return max([2**self.affine_net.downsamplings, *self.spacings])

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        if fixed.dim() != self.ndim + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"dlir: fixed and moving must both be (N, 1, *S) with {self.ndim} spatial dims; "
                f"got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        if min(fixed.shape[2:]) < self.min_size:
            raise ValueError(
                f"dlir: images {tuple(fixed.shape[2:])} are too small; every axis needs at least "
                f"{self.min_size} voxels (affine poolings, control spacings)"
            )

    def _compose(self, matrix: Tensor, fields: list[Tensor], pts: Tensor) -> Tensor:
        """Displacement of ``A ∘ (id + v_1) ∘ … ∘ (id + v_K)`` on the grid (``pts`` its index
        points ``(*S, D)``); the affine is applied exactly, the fields interpolated."""
        d = self.ndim
        y = pts.unsqueeze(0) + fields[-1].movedim(1, -1)
        for v in reversed(fields[:-1]):
            y = y + warp(v, (y - pts).movedim(-1, 1), "linear", "border").movedim(1, -1)
        y = torch.einsum("nij,n...j->n...i", matrix[:, :d, :d], y)
        y = y + matrix[:, :d, d].reshape(-1, *([1] * d), d)
        return (y - pts).movedim(-1, 1)

    def forward(self, fixed: Tensor, moving: Tensor) -> MethodOutput:
        self.check_pair(fixed, moving)
        shape = tuple(fixed.shape[2:])
        params = self.affine_net(fixed, moving)
        matrix = self.affine_net.matrix(params, shape)
        u = affine_displacement(matrix, shape)
        warped = [warp(moving, u)]
        last = self.stages - 1
        if self.training:
            last = max(self.trainable_stages)
        pts = index_grid(shape, fixed.dtype, fixed.device)
        fields: list[Tensor] = []
        extras: dict = {"affine": matrix, "affine_params": params}
        for k in range(1, last + 1):
            net = self.bspline_nets[k - 1]
            coeff = net(fixed, warped[-1])
            fields.append(evaluate_bspline(coeff, (net.spacing,) * self.ndim, shape))
            u = self._compose(matrix, fields, pts)
            warped.append(warp(moving, u))
            extras[f"coefficients_{k}"] = coeff
        extras["stage_warped"] = torch.cat(warped, 1)
        if fields:
            extras["bspline_fields"] = torch.stack(fields, 1)
        return MethodOutput(u, warped[-1], None, extras)

    def image_loss(self, fixed: Tensor, warped: Tensor) -> Tensor:
        if self.similarity == "ncc":
            return LF.ncc(fixed, warped)
        return LF.lncc(fixed, warped, window=self.window)

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        """``sim_k`` (negative NCC after stage ``k``) and ``bending_k`` of every stage run;
        ``total`` sums those of the trainable stages (bending weighted)."""
        stage_warped = output.extras["stage_warped"]
        total = batch.fixed.new_zeros(())
        out: dict[str, Tensor] = {}
        for k in range(stage_warped.shape[1]):
            sim = self.image_loss(batch.fixed, stage_warped[:, k : k + 1])
            out[f"sim_{k}"] = sim
            term = sim
            if k > 0:
                be = LF.bending_energy(output.extras["bspline_fields"][:, k - 1])
                out[f"bending_{k}"] = be
                term = term + self.bending_weight * be
            if k in self.trainable_stages:
                total = total + term
        out["similarity"] = out[f"sim_{stage_warped.shape[1] - 1}"]
        return {"total": total, **out}
