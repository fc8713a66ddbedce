"""Quicksilver (Yang, Kwitt, Styner and Niethammer, NeuroImage 2017): a patch network predicts
the initial momentum of LDDMM; the deformation is its geodesic shooting.

The prediction network (:class:`learnreg.nn.quicksilver.MomentumPatchNet`: two encoders,
one decoder per component) sees 15³ patches of the moving and target images and outputs the
momentum on the same patch; the whole image's momentum is the average of overlapping patches
(stride 14, :func:`learnreg.nn.patches.apply_patchwise`). It is trained supervised, with the
L1 distance to the momenta that an optimization-based LDDMM produced for the training pairs
— here learnreg's own classical LDDMM (:mod:`learnreg.data.lddmm_momenta`, ``data.synthetic:
{kind: lddmm-momenta}``), so no labels are used. The prediction is the geodesic of the
momentum (:class:`learnreg.spatial.lddmm.GeodesicShooting`, the kernel and steps of that
LDDMM), whose forward and backward maps come from one flow.

The correction network (``stage="correction"``, started from a prediction-stage checkpoint
with ``init:``; the prediction network is frozen): the same architecture, fed the moving
image and the target image warped back to the moving image by the predicted map
(``target ∘ φ``), trained on the residual ``m_LDDMM − m_predicted`` (L1); the final momentum
is their sum. The warped-back images are computed once per training pair (the frozen
prediction is deterministic) and kept in memory, as the paper prepared them once.

Training draws ``patches_per_pair`` random patches with content from every pair per step
(the paper trained on mini-batches of patches); prediction tiles the whole image. The map is
shot only when asked for (the training loss needs only the momentum patches;
:class:`MomentumOutput`).

Scaled down for CPUs (documented, configurable): 16 features in the first encoder block
(the paper: 64), no dropout (the paper's deterministic network), on LPBA40 at 4 mm
(40×48×40, the paper: OASIS/LPBA40 at 1 mm, 229×193×193); the LDDMM kernel is learnreg's
``lddmm`` preset's (``α = 100 mm², γ = 1, c = 2``, 5 steps; the paper used PyCA's
``α = 0.01, γ = 1, c = 3`` on unit voxels).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.blocks import AddCoords
from learnreg.nn.patches import apply_patchwise, crop_patches, random_corners
from learnreg.nn.quicksilver import MomentumPatchNet
from learnreg.spatial.base import SpatialTransform
from learnreg.spatial.lddmm import DEFAULT_KERNEL, GeodesicShooting
from learnreg.spatial.sampling import warp

__all__ = ["Quicksilver", "MomentumOutput"]

STAGES = ("prediction", "correction")


class MomentumOutput(MethodOutput):
    """A :class:`~learnreg.methods.base.MethodOutput` whose transform is built when first
    used: ``extras["momentum"]`` is there at once, the geodesic is shot on demand."""

    def __init__(
        self,
        build: Callable[[], SpatialTransform],
        grid: Grid,
        moving: Tensor | None,
        extras: dict,
    ) -> None:
        self._build, self._moving = build, moving
        self.grid, self.extras = grid, dict(extras)
        self._cache: dict[str, object] = {}

    def _get(self, key: str, make: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def transform(self) -> SpatialTransform:  # type: ignore[override]
        return self._get("transform", self._build)

    @property
    def displacement(self) -> Tensor:  # type: ignore[override]
        return self._get("displacement", lambda: self.transform.voxel_displacement(self.grid))

    @property
    def warped(self) -> Tensor | None:  # type: ignore[override]
        if self._moving is None:
            return None
        return self._get("warped", lambda: warp(self._moving, self.displacement))


def _digest(*tensors: Tensor) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@register_method(
    "quicksilver",
    year=2017,
    ndim="3D (2D by the same layers)",
    transform="LDDMM geodesic shooting of a predicted initial momentum (diffeomorphic)",
    loss="L1 to LDDMM momenta (patch-wise); correction network on the residual",
    supervision="supervised (initial momenta of learnreg's classical LDDMM)",
    reference="Yang et al., NeuroImage 2017",
    aliases=("yang2017", "qs"),
)
class Quicksilver(RegistrationMethod):
    """Patch-wise momentum prediction (+ correction) and geodesic shooting (module docstring).

    Args:
        ndim: 3 (the paper) or 2.
        features: channels of the first encoder block of both networks.
        dropout: dropout rate of the networks (the paper's probabilistic variant: 0.2).
        stride: tiling stride of the 15-voxel patches at prediction.
        patches_per_pair: random patches (with content) drawn from each training pair per
            step.
        stage: ``"prediction"`` (train the prediction network) or ``"correction"`` (both
            networks; the prediction network frozen, the correction network trained).
        kernel: ``{alpha (mm²), gamma, power}`` of the shooting (must be the LDDMM's that made
            the training momenta); default the ``lddmm`` preset's.
        steps: time steps of the shooting.
        coord_conv: CoordConv first layers fed each patch's position in the whole image.

    ``batch.target``: the LDDMM initial momentum ``(N, D, *S)`` on the network grid.
    """

    allow_no_similarity: ClassVar[bool] = True

    def __init__(
        self,
        ndim: int = 3,
        features: int = 16,
        dropout: float = 0.0,
        stride: int = 14,
        patches_per_pair: int = 8,
        stage: str = "prediction",
        kernel: dict | None = None,
        steps: int = 5,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        check_option("stage", stage, STAGES)
        if not 1 <= stride <= MomentumPatchNet.patch:
            raise ValueError(f"quicksilver: stride must be in 1..15, got {stride}")
        unknown = set(kernel or {}) - set(DEFAULT_KERNEL)
        if unknown:
            raise ValueError(f"quicksilver: unknown kernel keys {sorted(unknown)}")
        if patches_per_pair < 1:
            raise ValueError(f"quicksilver: patches_per_pair must be >= 1, got {patches_per_pair}")
        self.ndim, self.stride, self.stage = int(ndim), int(stride), stage
        self.patches_per_pair = int(patches_per_pair)
        self.kernel = {**DEFAULT_KERNEL, **(kernel or {})}
        self.steps = int(steps)
        self.resolve(kernel=self.kernel)
        self.prediction = MomentumPatchNet(ndim, features, dropout, coord_conv)
        self.correction = (
            MomentumPatchNet(ndim, features, dropout, coord_conv) if stage == "correction" else None
        )
        self.add_coords = AddCoords(ndim) if coord_conv else None
        if self.correction is not None:
            self.prediction.requires_grad_(False)
        self._warped_back: dict[str, Tensor] = {}

    def train(self, mode: bool = True) -> Quicksilver:
        super().train(mode)
        if self.correction is not None:
            self.prediction.eval()  # frozen: deterministic, no dropout
        return self

    def initial_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A correction stage starts from a prediction-stage checkpoint: its prediction
        network takes those weights, the correction network keeps its initialization."""
        mine = self.state_dict()
        if self.correction is not None and state and set(state) < set(mine):
            return {**mine, **state}
        return state

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        if fixed.dim() != self.ndim + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"quicksilver: fixed and moving must both be (N, 1, *S) with {self.ndim} spatial "
                f"dims; got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )

    def _inputs(self, moving: Tensor, target: Tensor) -> Tensor:
        """The networks' input channels over the whole image: moving, target (and, with
        CoordConv, the image's coordinate channels, so each patch carries its position)."""
        pair = [moving, target]
        if self.add_coords is not None:
            c = self.add_coords.coords(tuple(moving.shape[2:]), moving.dtype, moving.device)
            pair.append(c.expand(moving.shape[0], *c.shape[1:]))
        return torch.cat(pair, 1)

    def _patchwise(self, net: MomentumPatchNet, moving: Tensor, target: Tensor) -> Tensor:
        return apply_patchwise(net, self._inputs(moving, target), net.patch, self.stride, self.ndim)

    def momentum(self, fixed: Tensor, moving: Tensor, grid: Grid) -> dict[str, Tensor]:
        """The whole-image momenta (tiled patches): ``predicted``, with a correction stage
        also ``correction`` and their sum, ``momentum``."""
        out = {"predicted": self._patchwise(self.prediction, moving, fixed)}
        out["momentum"] = out["predicted"]
        if self.correction is not None:
            m = out["predicted"].detach()
            back = self._warped_back_target(fixed, moving, m, grid)
            out["correction"] = self._patchwise(self.correction, moving, back)
            out["momentum"] = m + out["correction"]
        return out

    def shoot(self, momentum: Tensor, grid: Grid) -> GeodesicShooting:
        """The geodesic of ``momentum`` ``(N, D, *S)`` on ``grid`` (``α`` in mm² of it)."""
        return GeodesicShooting(grid, momentum, **self.kernel, steps=self.steps, physical=True)

    def _warped_back_target(self, fixed: Tensor, moving: Tensor, m: Tensor, grid: Grid) -> Tensor:
        """``fixed ∘ φ`` of the predicted momentum ``m`` (the correction network's input);
        remembered per training pair while training (the frozen prediction repeats)."""
        out = []
        for i in range(fixed.shape[0]):
            key = _digest(fixed[i], moving[i]) if self.training else None
            if key is not None and key in self._warped_back:
                out.append(self._warped_back[key])
                continue
            with torch.no_grad():
                forward = self.shoot(m[i : i + 1], grid).forward_displacement()
                back = warp(fixed[i : i + 1], forward)
            if key is not None:
                self._warped_back[key] = back
            out.append(back)
        return torch.cat(out)

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        self.check_pair(fixed, moving)
        grid = grid if grid is not None else unit_grid(fixed)
        if not self.training:
            extras = self.momentum(fixed, moving, grid)
            return MomentumOutput(
                lambda: self.shoot(extras["momentum"], grid), grid, moving, extras
            )
        # training: random patches with content (the paper's mini-batches of patches)
        patch = self.prediction.patch
        corners = random_corners(fixed + moving, patch, self.patches_per_pair)
        pair = crop_patches(self._inputs(moving, fixed), corners, patch)
        patches = self.prediction(pair)
        if self.correction is not None:
            with torch.no_grad():  # the frozen prediction network runs in eval mode
                m = self._patchwise(self.prediction, moving, fixed)
            back = self._warped_back_target(fixed, moving, m, grid)
            residual = self.correction(crop_patches(self._inputs(moving, back), corners, patch))
            patches = patches.detach() + residual
        extras = {"momentum_patches": patches, "corners": corners}

        def build() -> SpatialTransform:
            with torch.no_grad():
                return self.shoot(self.momentum(fixed, moving, grid)["momentum"], grid)

        return MomentumOutput(build, grid, moving, extras)

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        """L1 between predicted and LDDMM momenta: on the training patches (training), on the
        whole grid otherwise."""
        target, f = batch.target, batch.fixed
        want = (f.shape[0], self.ndim, *f.shape[2:])
        if target is None or tuple(target.shape) != want:
            got = None if target is None else tuple(target.shape)
            raise ValueError(
                f"quicksilver: supervised by LDDMM initial momenta; the batch needs target {want}"
                f" (e.g. data.synthetic: {{kind: lddmm-momenta}}), got {got}"
            )
        if "momentum_patches" in output.extras:
            pred = output.extras["momentum_patches"]
            target = crop_patches(target, output.extras["corners"], self.prediction.patch)
        else:
            pred = output.extras["momentum"]
        l1 = (pred - target.to(pred.dtype)).abs().mean()
        return {"momentum_l1": l1, "total": l1}

    def transform_error(self, batch: RegistrationBatch, output: MethodOutput) -> Tensor:
        """Mean ``|m − m_LDDMM|`` (L1 over components) per pair ``(N,)``."""
        if "momentum" not in output.extras:
            raise ValueError("quicksilver: the transform error is of whole-grid (eval) outputs")
        d = (output.extras["momentum"] - batch.target).abs().sum(1)
        return d.flatten(1).mean(1)
