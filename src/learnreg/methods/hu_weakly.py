"""Weakly supervised global + local registration (Hu et al., MedIA 2018; label-reg).

Two networks, trained only with labels (prediction needs the images alone):

* the **global** network — a VGG-style encoder on the channel-stacked pair and a fully
  connected layer (:class:`~learnreg.nn.regression.ParameterRegressor`) — regresses the
  ``D (D+1)`` parameters of an affine transform, initialized to the identity (zero weights
  and bias of the last layer, as label-reg's ``transform_initial``);
* the **local** network — a U-Net (:class:`~learnreg.nn.unet.UNet`) with a
  :class:`~learnreg.nn.blocks.FlowHead` — predicts a dense displacement ``u_L`` from the
  moving image *already warped by the affine* and the fixed image.

**Composite transform, fixed → moving.** Let ``A(x) = c + L (x − c) + h t`` be the affine in
voxel coordinates of the network grid (``c`` the grid centre, ``h`` half the largest grid
extent, so parameters are unitless: ``[L | t] − [I | 0]`` of the affine acting on
``q = (x − c) / h``, :class:`~learnreg.spatial.linear.Affine`'s layout; :func:`affine_matrix`).
The local network registers the fixed image to ``moving ∘ A``, so a fixed point ``x`` goes
first through the dense field, then through the affine::

    φ(x) = A(x + u_L(x)),     displacement u(x) = u_A(x) + L u_L(x)

i.e. the moving image is aligned affinely first, then deformed locally; ``φ`` is exact (no
resampling of fields), and the moving image is warped once, by ``u``. (label-reg adds the two
displacements, ``A(x) + u_L(x)``, which differs by ``(L − I) u_L``.) In world space (the
network grid ``G``) the method's transform is an :class:`~learnreg.spatial.AffineTransform`
``G A G⁻¹`` (global; written as an ITK matrix), a :class:`~learnreg.spatial.DisplacementField`
``u_L`` on ``G`` (local), or ``TransformChain([DisplacementField(G, u_L), G A G⁻¹])``
(composite).

**Loss** (``stage="composite"``): multi-scale soft Dice (:func:`~learnreg.losses.functional.
multiscale_dice`, Gaussian σ in ``scales`` voxels of the network grid, label-reg's
``[0, 1, 2, 4, 8, 16]``) between the fixed masks and the moving masks warped by ``u`` (linear
interpolation, so it is differentiable) + ``reg_weight`` × bending energy of ``u_L`` (voxel
units; label-reg's weight 0.5). Every label channel is used: the Dice is computed per
channel and averaged over the channels present in both masks of a pair (label-reg draws one
label per pair at random each iteration, the same objective in expectation), then over the
batch. Labels are float masks ``(N, L, *S)`` (channels may overlap, as the prostate gland and
its landmark regions) or integer label maps ``(N, 1, *S)`` (one-hot over the union of values,
background dropped).

``stage="global"`` trains the global network alone (Dice only: an affine has no bending
energy); ``stage="local"`` the local network alone on the unaligned pair (label-reg's
``network_type``). The paper's own sizes (label-reg: global channels 8–128 with residual
blocks and batch norm; local channels 32–512 with residual blocks and displacement summands
from several levels) are scaled down for CPU training: plain conv blocks, global
``(8, 16, 32, 64, 128)`` without normalization; the paper's local net is
``local_net: residual`` (:class:`~learnreg.nn.local_net.LocalNet`, channels 16–32 and a
64-channel bridge for CPU),
the default ``unet`` a 3-level U-Net ``(16, 32, 32)`` with one full-resolution displacement
head. The U-Net stays the default for speed, with no clear loss of accuracy: in one run of
``benchmarks/prostate_hu.py --global-steps 150 --composite-steps 300 --residual-local`` (the
same global stage, steps and data for both), the residual net reached gland Dice 0.711 vs
0.665 on the two test pairs but landmark TRE 2.74 vs 2.41 mm and a rougher field (SDlogJ in
the gland 0.60 vs 0.30), in 290 vs 158 s of training. All fields are in voxel units of the
network grid.

Training recipe of ``benchmarks/prostate_hu.py`` (MR→TRUS prostate pairs on a 0.8 mm TRUS
grid): the global stage first, then the composite with its global network initialized from
it (``init:`` the global run's checkpoint, :meth:`HuGlobalLocal.initial_state`), trained end
to end; Adam at 1e-3 for a few hundred steps of batch 4 (label-reg: 1e-5 for
10 000 iterations) with label-reg's independent random affine augmentation of both images
(:class:`~learnreg.data.prostate.MaskAugmenter`).
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
from learnreg.methods.voxelmorph import one_hot_union
from learnreg.nn.blocks import FlowHead
from learnreg.nn.local_net import LocalNet
from learnreg.nn.regression import ParameterRegressor
from learnreg.nn.unet import UNet
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.base import SpatialTransform, TransformChain
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.frame import index_matrix_to_world
from learnreg.spatial.linear import Affine
from learnreg.spatial.sampling import warp

__all__ = ["HuGlobalLocal", "STAGES", "REGULARIZERS", "affine_matrix", "label_masks"]

STAGES = ("global", "local", "composite")
LOCAL_NETS = ("unet", "residual")
REGULARIZERS = ("bending", "diffusion")


def affine_matrix(params: Tensor, shape: Sequence[int]) -> Tensor:
    """Index-space homogeneous matrices ``(N, D+1, D+1)`` of the global network's affines.

    ``params (N, D (D+1))`` are :class:`~learnreg.spatial.linear.Affine` parameters
    (``[L | t] − [I | 0]``, row-major; zeros = identity) of the affine acting on the
    normalized coordinates ``q = (x − c) / h`` of a grid of ``shape`` (``c`` its centre, ``h``
    half its largest extent in voxels): ``A(x) = c + h (L q + t) = c + L (x − c) + h t``.
    2D (6 parameters) or 3D (12). Differentiable.
    """
    d = len(shape)
    if d not in (2, 3) or params.dim() != 2 or params.shape[1] != d * (d + 1):
        raise ValueError(
            f"affine_matrix: params must be (N, {d * (d + 1)}) for a {d}D grid of shape "
            f"{tuple(shape)} (2D or 3D); got {tuple(params.shape)}"
        )
    centre = Grid(tuple(int(s) for s in shape)).index_center
    h = max(max(centre), 1.0)
    m = params.view(-1, d, d + 1)
    scaled = torch.cat([m[..., :d], m[..., d:] * h], -1).reshape(params.shape)
    return Affine.from_params(scaled, center=centre).homogeneous()


def label_masks(fixed_labels: Tensor, moving_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Float masks ``(N, L, *S)`` of both label tensors: float masks pass through; integer
    label maps ``(N, 1, *S)`` are one-hot encoded over the union of their values (no
    background)."""
    if fixed_labels.shape != moving_labels.shape:
        raise ValueError(
            f"fixed and moving labels must have the same shape; got "
            f"{tuple(fixed_labels.shape)} and {tuple(moving_labels.shape)}"
        )
    if fixed_labels.is_floating_point() != moving_labels.is_floating_point():
        raise ValueError("fixed and moving labels must both be float masks or both label maps")
    if fixed_labels.is_floating_point():
        return fixed_labels, moving_labels
    if fixed_labels.shape[1] != 1:
        raise ValueError(
            f"integer labels must be label maps (N, 1, *S); got {tuple(fixed_labels.shape)} "
            f"(pass multi-channel masks as floats)"
        )
    return one_hot_union(fixed_labels, moving_labels)


@register_method(
    "hu-global-local",
    year=2018,
    ndim="2D/3D",
    transform="affine then dense displacement (composite)",
    loss="multi-scale Dice of labels + bending energy",
    supervision="weakly supervised (labels in training only)",
    reference="Hu et al., MedIA 2018",
    aliases=("hu-weakly", "label-reg"),
)
class HuGlobalLocal(RegistrationMethod):
    """Hu et al.'s weakly supervised global (affine) + local (dense) registration networks.

    Args:
        ndim: 2 or 3.
        shape: spatial size of the network grid (the global network's fully connected layer
            is built for it); required unless ``stage="local"``.
        stage: ``"composite"`` (affine then dense, the paper's model), ``"global"`` (affine
            only) or ``"local"`` (dense only).
        global_features: channels of the global encoder's conv blocks; the size is halved
            after each block but the last (max pooling).
        global_norm: normalization of the global encoder (None, ``"batch"``, ``"instance"``).
        coord_conv: CoordConv first layer of the global encoder and of the U-Net.
        enc_features, dec_features: the local :class:`~learnreg.nn.unet.UNet`; the grid size
            must be divisible by ``2**len(enc_features)``.
        scales: Gaussian σ (voxels) of the multi-scale Dice.
        reg_weight: weight of the regularizer of the local displacement.
        regularizer: ``"bending"`` (the paper's) or ``"diffusion"``.
        local_net: ``"unet"`` (a VoxelMorph-style U-Net and one full-resolution
            displacement head; ``enc_features``/``dec_features``) or ``"residual"`` (the
            paper's local net, :class:`~learnreg.nn.local_net.LocalNet`: residual blocks,
            summation skips, the displacement the sum of fields predicted at every level;
            ``local_features``).
        local_features: channels of the residual local net's levels (paper: 32–256).

    Extras: ``"affine_params"``, ``"affine_matrix"`` (index space, :func:`affine_matrix`) and
    ``"affine_displacement"`` (global stages),
    ``"local_displacement"`` (local stages), ``"warped_affine"`` (composite: the moving image
    after the affine alone).
    """

    def __init__(
        self,
        ndim: int = 3,
        shape: Sequence[int] | None = None,
        stage: str = "composite",
        global_features: Sequence[int] = (8, 16, 32, 64, 128),
        global_norm: str | None = None,
        coord_conv: bool = False,
        enc_features: Sequence[int] = (16, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 16, 16),
        scales: Sequence[float] = (0, 1, 2, 4, 8, 16),
        reg_weight: float = 0.5,
        regularizer: str = "bending",
        local_net: str = "unet",
        local_features: Sequence[int] = (16, 32, 32),
    ) -> None:
        super().__init__()
        check_option("ndim", ndim, (2, 3))
        check_option("stage", stage, STAGES)
        check_option("regularizer", regularizer, REGULARIZERS)
        check_option("local_net", local_net, LOCAL_NETS)
        if reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {reg_weight}")
        if not scales or any(float(s) < 0 for s in scales):
            raise ValueError(f"scales must be non-negative Gaussian sigmas, got {scales}")
        self.ndim, self.stage = ndim, stage
        self.scales = tuple(float(s) for s in scales)
        self.reg_weight, self.regularizer = float(reg_weight), regularizer
        self.shape: tuple[int, ...] | None = None
        self.global_net: ParameterRegressor | None = None
        self.unet: UNet | None = None
        self.flow: FlowHead | None = None
        self.local_net: LocalNet | None = None
        if stage != "local":
            if shape is None or len(shape) != ndim:
                raise ValueError(
                    f"hu-global-local: stage {stage!r} needs shape, the {ndim}D network grid "
                    f"size (the global network's fully connected layer depends on it); "
                    f"got {shape!r}"
                )
            self.shape = tuple(int(s) for s in shape)
            self.resolve(shape=list(self.shape))
            feats = [int(f) for f in global_features]
            self.global_net = ParameterRegressor(
                ndim,
                self.shape,
                ndim * (ndim + 1),
                encoder={
                    "mode": "two-channel",
                    "features": feats,
                    "downsample_after": tuple(range(len(feats) - 1)),
                    "pooling": "max",
                    "norm": global_norm,
                    "coord_conv": coord_conv,
                },
                head={"hidden": (), "dropout": 0.0, "init_std": 0.0},
            )
        if stage != "global" and local_net == "residual":
            self.local_net = LocalNet(ndim, 2, local_features)
        elif stage != "global":
            self.unet = UNet(ndim, 2, enc_features, dec_features, coord_conv=coord_conv)
            self.flow = FlowHead(ndim, self.unet.out_channels)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self.shape

    @property
    def size_multiple(self) -> int:
        if self.local_net is not None:
            return self.local_net.size_multiple
        return 1 if self.unet is None else self.unet.size_multiple

    def initial_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Start a composite model from a global-stage (or local-stage) checkpoint, the
        paper's recipe: its networks take the checkpoint's weights, the other network keeps
        its fresh initialization. Other checkpoints are used as they are."""
        mine = self.state_dict()
        if self.stage == "composite" and state and set(state) < set(mine):
            return {**mine, **state}
        return state

    def check_pair(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> None:
        if fixed.dim() != self.ndim + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"{self.name}: fixed and moving must both be (N, 1, *S) with {self.ndim} "
                f"spatial dims; got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        if self.shape is not None and tuple(fixed.shape[2:]) != self.shape:
            raise ValueError(
                f"{self.name}: built for the network grid {self.shape}, got images of size "
                f"{tuple(fixed.shape[2:])}"
            )
        if grid is not None and grid.shape != tuple(fixed.shape[2:]):
            raise ValueError(
                f"{self.name}: images {tuple(fixed.shape[2:])} are not on the grid {grid}"
            )

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        self.check_pair(fixed, moving, grid)
        grid = unit_grid(fixed) if grid is None else grid
        extras: dict = {}
        parts: list[SpatialTransform] = []
        if self.global_net is not None:
            params = self.global_net(fixed, moving)
            matrix = affine_matrix(params, grid.shape)
            affine = AffineTransform(index_matrix_to_world(matrix, grid))
            extras["affine_params"], extras["affine_matrix"] = params, matrix
            extras["affine_displacement"] = affine.voxel_displacement(grid)
            parts.append(affine)
        if self.unet is not None or self.local_net is not None:
            local_in = warp(moving, extras["affine_displacement"]) if parts else moving
            pair = torch.cat([local_in, fixed], 1)
            if self.local_net is not None:
                local = self.local_net(pair)
            else:
                assert self.unet is not None and self.flow is not None
                local = self.flow(self.unet(pair))
            extras["local_displacement"] = local
            if parts:
                extras["warped_affine"] = local_in
            parts.insert(0, DisplacementField(grid, local))  # φ(x) = A(x + u_L(x))
        transform = parts[0] if len(parts) == 1 else TransformChain(parts)
        return MethodOutput(transform, grid, moving, extras)

    def label_loss(self, fixed_masks: Tensor, warped_masks: Tensor, valid: Tensor) -> Tensor:
        """Multi-scale Dice loss per channel, averaged over ``valid`` channels ``(N, L)`` of
        each pair, then over the pairs that have any."""
        n, l_ = fixed_masks.shape[:2]
        flat = (n * l_, 1, *fixed_masks.shape[2:])
        per = LF.multiscale_dice(
            fixed_masks.reshape(flat), warped_masks.reshape(flat), self.scales, reduction="none"
        ).view(n, l_)
        w = valid.to(per.dtype)
        count = w.sum(1)
        per_pair = (per * w).sum(1) / count.clamp_min(1)
        has = (count > 0).to(per.dtype)
        return (per_pair * has).sum() / has.sum().clamp_min(1)

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        if batch.fixed_labels is None or batch.moving_labels is None:
            raise ValueError(
                f"{self.name}: the loss needs fixed_labels and moving_labels in the batch "
                f"(labels are used only in training)"
            )
        fixed_m, moving_m = label_masks(batch.fixed_labels, batch.moving_labels)
        if fixed_m.shape[2:] != output.displacement.shape[2:]:
            raise ValueError(
                f"{self.name}: labels {tuple(fixed_m.shape)} are not on the displacement's "
                f"grid {tuple(output.displacement.shape[2:])}"
            )
        fixed_m, moving_m = (
            fixed_m.to(output.displacement.dtype),
            moving_m.to(output.displacement.dtype),
        )
        valid = (fixed_m.flatten(2).sum(-1) > 0) & (moving_m.flatten(2).sum(-1) > 0)
        warped_m = warp(moving_m, output.displacement)
        out = {"dice": self.label_loss(fixed_m, warped_m, valid)}
        total = out["dice"]
        if "local_displacement" in output.extras:
            fn = LF.bending_energy if self.regularizer == "bending" else LF.diffusion
            out[self.regularizer] = fn(output.extras["local_displacement"])
            total = total + self.reg_weight * out[self.regularizer]
        out["total"] = total
        return out
