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

**Transform.** On the network grid ``G`` (a :class:`~learnreg.core.Grid` in world space) the
networks think in voxel indices: the affine ``A`` about the grid centre (:mod:`learnreg.data.
perturb` conventions), B-spline control displacements in voxels. Stage ``k`` (spacing
``s_k``, field ``v_k``) sees ``moving ∘ φ_{k−1}`` and the map becomes ``φ_k = φ_{k−1} ∘ (id +
v_k)``, with ``φ_0 = A``. The method's transform, fixed world → moving world, is therefore
``TransformChain([B_K, …, B_1, A_world])``: the last B-spline stage acts first on fixed
points, the affine (``G M G⁻¹``, an :class:`~learnreg.spatial.AffineTransform`, written as
an ITK matrix) last; each ``B_k`` is a :class:`~learnreg.spatial.BSplineTransform` on ``G``.
``moving`` is resampled once through it (no interpolation build-up). A B-spline field is
zero outside the grid (ITK's convention), also where an earlier stage maps a point out of it.

Scaled down for CPUs (documented, configurable): 16 kernels per layer (paper: 32;
``affine_features`` / ``bspline_features``), one hidden fully connected layer of 64 units,
LeakyReLU(0.2) (paper: ELU, ``activation: elu``), spacings 8 and 4 voxels on a 4 mm grid
(32 mm and 16 mm). **Patches.** The paper's B-spline ConvNet is patch-based: each control
point's displacement is computed from the image patch around it (its receptive field), and
training samples patches to fit GPU memory. The ConvNet here is the same fully
convolutional function — convolutions, average poolings and 1×1 layers, so every control
point's output depends only on its receptive field (measured with the default 5 layers: a
patch of 38 voxels per axis for spacing 4, 62 for spacing 8) — evaluated on all patches of
the image at once; on the 40×48×40
volumes of the CPU recipe the whole image costs less than a batch of the paper's patches. On LPBA40 at 8 mm, Adam with 3e-3 for the affine stage and 1e-3 for a B-spline
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
from torch import Tensor, nn

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.losses import functional as LF
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.blocks import ConvBlock, conv_nd
from learnreg.nn.regression import PairEncoder, RegressionHead, VGGEncoder
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.base import SpatialTransform, TransformChain
from learnreg.spatial.bspline import BSplineTransform, control_lattice_shape
from learnreg.spatial.frame import index_matrix_to_world
from learnreg.spatial.linear import rotation_matrix
from learnreg.spatial.sampling import sample, warp

__all__ = [
    "SIMILARITIES",
    "decomposed_affine",
    "AffineNet",
    "BSplineNet",
    "DLIR",
]

SIMILARITIES = ("ncc", "lncc")


# ---------------------------------------------------------------------------- helpers
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
    (linearly, border-extended) at the control points of a B-spline lattice of that spacing.

    Both are grids in the voxel coordinates of the image grid: feature cell ``j`` is centred
    at voxel ``j s + (s − 1) / 2`` (average pooling by ``s``), control point ``k`` sits at
    voxel ``(k − 1) s`` (:mod:`learnreg.spatial.bspline`)."""
    d, s = len(shape), float(spacing)
    cells = Grid(tuple(features.shape[2:]), (s,) * d, ((s - 1) / 2,) * d)
    lattice = Grid(control_lattice_shape(shape, [spacing] * d), (s,) * d, (-s,) * d)
    coords = cells.world_to_grid_sample(lattice.world_points(features.dtype, features.device))
    return sample(features, coords.unsqueeze(0), "linear", "border")


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
        activation: ``"elu"`` (paper) or ``"leaky_relu"`` (slope 0.2).
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
        activation: str = "leaky_relu",
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
            activation=activation,
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

    def matrix(self, params: Tensor, grid: Grid) -> Tensor:
        """Index-space matrices ``(N, D+1, D+1)`` about the centre of ``grid``; translations
        are in half-extents of the grid, ``(S − 1) / 2`` voxels per axis."""
        t, w, s, sh = params.split(self.sizes, 1)
        half = torch.tensor(grid.index_center, dtype=params.dtype, device=params.device)
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
        activation: str = "leaky_relu",
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
            activation=activation,
        )
        self.dense = nn.Sequential(
            *[
                ConvBlock(ndim, f, f, kernel_size=1, norm=norm, activation=activation)
                for _ in range(dense)
            ]
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
        activation: of every conv layer: ``"elu"`` (paper) or ``"leaky_relu"`` (0.2).
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
        activation: str = "leaky_relu",
        similarity: str = "ncc",
        window: int = 9,
        bending_weight: float = 1.0,
        trainable_stages: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        check_option("ndim", ndim, (2, 3))
        check_option("similarity", similarity, SIMILARITIES)
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
            activation,
        )
        self.bspline_nets = nn.ModuleList(
            BSplineNet(
                ndim,
                s,
                bspline_features,
                bspline_layers,
                bspline_dense,
                norm,
                coord_conv,
                activation,
            )
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

    def check_pair(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> None:
        if fixed.dim() != self.ndim + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"dlir: fixed and moving must both be (N, 1, *S) with {self.ndim} spatial dims; "
                f"got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        if grid is not None and grid.shape != tuple(fixed.shape[2:]):
            raise ValueError(f"dlir: images {tuple(fixed.shape[2:])} are not on the grid {grid}")
        if min(fixed.shape[2:]) < self.min_size:
            raise ValueError(
                f"dlir: images {tuple(fixed.shape[2:])} are too small; every axis needs at least "
                f"{self.min_size} voxels (affine poolings, control spacings)"
            )

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        self.check_pair(fixed, moving, grid)
        grid = unit_grid(fixed) if grid is None else grid
        params = self.affine_net(fixed, moving)
        matrix = self.affine_net.matrix(params, grid)
        parts: list[SpatialTransform] = [AffineTransform(index_matrix_to_world(matrix, grid))]
        last = max(self.trainable_stages) if self.training else self.stages - 1
        warped: list[Tensor] = []
        fields: list[Tensor] = []
        extras: dict = {"affine": matrix, "affine_params": params}
        for k in range(1, last + 1):
            so_far = parts[0] if len(parts) == 1 else TransformChain(parts)
            warped.append(warp(moving, so_far.voxel_displacement(grid)))
            net = self.bspline_nets[k - 1]
            coeff = net(fixed, warped[-1])
            bspline = BSplineTransform(grid, net.spacing, params=coeff)
            fields.append(bspline.voxel_field())
            parts.insert(0, bspline)  # acts on fixed points before the earlier stages
            extras[f"coefficients_{k}"] = coeff
        transform = parts[0] if len(parts) == 1 else TransformChain(parts)
        out = MethodOutput(transform, grid, moving, extras)
        out.extras["stage_warped"] = torch.cat([*warped, out.warped], 1)
        if fields:
            out.extras["bspline_fields"] = torch.stack(fields, 1)
        return out

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
