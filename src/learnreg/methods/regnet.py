"""RegNet (Sokooti et al., MICCAI 2017): multi-scale patch network for the displacement at a
patch centre, trained on simulated smooth fields.

Sokooti, de Vos, Berendsen, Lelieveldt, Išgum and Staring, "Nonrigid image registration using
multi-scale 3D convolutional neural networks", MICCAI 2017. The network sees, around a voxel,
a 29³ patch of the fixed and of the moving image at full resolution and a 54³ neighbourhood
of each taken at every second voxel (27³) — the context scale — and predicts the displacement
of that voxel:

* each scale's fixed and moving patches pass through three 3×3×3 convolutions of 16 channels
  (weights shared between fixed and moving — the siamese streams; ``shared_weights=False``:
  one stream per image, as the authors' released code has it);
* per scale the two streams are concatenated; the full-resolution branch goes on through
  convolutions of 25 and 30 channels and a 2×2×2 max pool, the context branch through six
  (25, 25, 25, 30, 30, 30), both to 9³;
* the two scales are concatenated and merged by convolutions of 60, 70, 75 and 150 channels
  to 1³, then two fully connected layers (1×1×1 convolutions, 150 and 3 outputs).

Every convolution is "valid" (no padding) and followed by batch normalization and a ReLU
(except the output). Training is supervised on patches: random smooth displacement fields of
several frequencies and magnitudes applied to real images (here LPBA40 T1 volumes, or 2D
slices, by :class:`learnreg.data.random_warps.RandomWarpPairs` ``kind="dense"``, a random
affine plus B-spline fields of several control-point spacings); the loss is the mean
residual distance ``|û − u|`` between the predicted and the true displacement at the sampled
patch centres. In training mode :meth:`RegNet.forward` samples ``patches_per_pair`` centres
per pair in the fixed image's foreground and predicts only there (:class:`PatchPredictions`);
in eval mode it predicts over the whole image at once — all layers are convolutions, so the
network slides over the zero-padded image and gives the displacement at every second voxel,
upsampled linearly (a :class:`~learnreg.spatial.displacement.DisplacementField` on that
stride-2 grid).

Scaled down for CPUs (configurable, documented): ``width`` multiplies every channel count
(1.0 is the paper's); the patch sizes are the paper's. The paper's class balancing of the
sampled displacement magnitudes is left out (centres are uniform over the foreground).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnreg.core.grid import Grid
from learnreg.methods.base import (
    MethodOutput,
    RegistrationBatch,
    RegistrationMethod,
    dense_target,
    unit_grid,
)
from learnreg.methods.flownet import endpoint_error
from learnreg.methods.registry import register_method
from learnreg.nn.blocks import CoordConv, conv_nd
from learnreg.spatial.displacement import DisplacementField

__all__ = ["RegNet", "RegNetwork", "PatchPredictions", "extract_patches", "PATCH", "CONTEXT"]

#: Side of the full-resolution patch (voxels).
PATCH = 29
#: Side of the context neighbourhood, sampled at every second voxel (27 samples).
CONTEXT = 54
_STREAM = (16, 16, 16)
_FULL = (25, 30)
_LOW = (25, 25, 25, 30, 30, 30)
_MERGE = (60, 70, 75, 150)
_HIDDEN = 150


def _radius(size: int, step: int) -> int:
    """Half-width in voxels of a patch of ``size`` samples at ``step`` (29 → 14, 54 → 26)."""
    return (size - 1) // 2 if step == 1 else (size // step - 1) * step // 2


def extract_patches(image: Tensor, centres: Tensor, size: int, step: int = 1) -> Tensor:
    """Patches ``(N·K, C, *[n]*D)`` of ``image`` ``(N, C, *S)`` around ``centres`` ``(N, K, D)``
    (integer voxel indices): ``n`` samples per axis at ``step`` voxels, centred on the voxel
    (``size`` 29, step 1: 29 samples; ``size`` 54, step 2: the 27 samples ``c − 26 … c + 26``),
    zero outside the image."""
    ndim = image.dim() - 2
    size_t = torch.tensor(image.shape[2:], device=centres.device)
    if (
        centres.dim() != 3
        or centres.shape[-1] != ndim
        or bool(((centres < 0) | (centres >= size_t)).any())
    ):
        raise ValueError(
            f"extract_patches: centres must be (N, K, {ndim}) voxel indices inside "
            f"{tuple(image.shape[2:])}, got shape {tuple(centres.shape)}"
        )
    r = _radius(size, step)
    n = 2 * r // step + 1
    padded = F.pad(image, [r] * (2 * ndim))
    out = []
    for i in range(image.shape[0]):
        for c in centres[i].tolist():
            window = tuple(slice(v, v + 2 * r + 1, step) for v in c)
            out.append(padded[(i, slice(None), *window)])
    patches = torch.stack(out)
    assert patches.shape[2:] == (n,) * ndim
    return patches


def _valid_convs(ndim: int, cin: int, channels: Sequence[int]) -> nn.Sequential:
    conv, norm = conv_nd(ndim), nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d
    layers: list[nn.Module] = []
    for c in channels:
        layers += [conv(cin, c, 3, bias=False), norm(c), nn.ReLU(inplace=True)]
        cin = c
    return nn.Sequential(*layers)


class RegNetwork(nn.Module):
    """RegNet's network (module docstring), fully convolutional.

    ``forward(fixed, moving, fixed_low, moving_low, coords)``: full-resolution inputs
    ``(N, 1, *S)`` and context inputs (every second voxel) ``(N, 1, *S_low)``; on a 29-patch
    and its 27-sample context the output is ``(N, D, 1, …)``; on a padded image
    (:meth:`dense_inputs`) it is the displacement at every second voxel. ``coord_conv``: the
    first fully connected layer is a CoordConv that also sees ``coords``, the normalized
    position of each output voxel in the whole image (a patch has no position of its own).
    """

    def __init__(
        self,
        ndim: int = 3,
        width: float = 1.0,
        shared_weights: bool = True,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"RegNet: width must be > 0, got {width}")

        def scaled(cs: Sequence[int]) -> list[int]:
            return [max(2, round(c * width)) for c in cs]

        stream, full, low, merge = scaled(_STREAM), scaled(_FULL), scaled(_LOW), scaled(_MERGE)
        hidden = scaled([_HIDDEN])[0]
        self.ndim, self.shared_weights = ndim, bool(shared_weights)
        count = 2 if shared_weights else 4  # (full, low) × (fixed, moving unless shared)
        self.streams = nn.ModuleList([_valid_convs(ndim, 1, stream) for _ in range(count)])
        self.full = _valid_convs(ndim, 2 * stream[-1], full)
        self.low = _valid_convs(ndim, 2 * stream[-1], low)
        self.merge = _valid_convs(ndim, full[-1] + low[-1], merge)
        conv = conv_nd(ndim)
        norm = nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d
        self.coord_conv = bool(coord_conv)
        if coord_conv:
            opts = {"kernel_size": 1, "norm": "batch", "negative_slope": 0.0}
            self.hidden: nn.Module = CoordConv(ndim, merge[-1], hidden, **opts)
        else:
            self.hidden = nn.Sequential(
                conv(merge[-1], hidden, 1, bias=False), norm(hidden), nn.ReLU(inplace=True)
            )
        self.head = conv(hidden, ndim, 1)
        self.pool = nn.MaxPool2d(2) if ndim == 2 else nn.MaxPool3d(2)

    def _stream(self, scale: int, image: int) -> nn.Module:
        return self.streams[scale if self.shared_weights else 2 * scale + image]

    def forward(
        self,
        fixed: Tensor,
        moving: Tensor,
        fixed_low: Tensor,
        moving_low: Tensor,
        coords: Tensor | None = None,
    ) -> Tensor:
        full = torch.cat([self._stream(0, 0)(fixed), self._stream(0, 1)(moving)], 1)
        low = torch.cat([self._stream(1, 0)(fixed_low), self._stream(1, 1)(moving_low)], 1)
        full, low = self.pool(self.full(full)), self.low(low)
        size = [min(a, b) for a, b in zip(full.shape[2:], low.shape[2:], strict=True)]
        crop = (slice(None), slice(None), *[slice(0, s) for s in size])
        x = self.merge(torch.cat([full[crop], low[crop]], 1))
        if self.coord_conv:
            if coords is None:
                raise ValueError("RegNetwork: coord_conv needs the coords of the outputs")
            return self.head(self.hidden(x, coords))
        return self.head(self.hidden(x))

    @staticmethod
    def dense_inputs(image: Tensor) -> tuple[Tensor, Tensor]:
        """The full-resolution and context inputs for a prediction at voxels ``0, 2, 4, …``
        up to the last voxel (or one past it, for even sizes): the image zero-padded by the
        patch radii, the context one taken at every second voxel."""
        ndim = image.dim() - 2
        odd = [0 if s % 2 else 1 for s in image.shape[2:]]  # centres end on the last voxel
        r, rl = _radius(PATCH, 1), _radius(CONTEXT, 2)
        pad = [p for e in reversed(odd) for p in (r, r + e)]
        pad_low = [p for e in reversed(odd) for p in (rl, rl + e)]
        low = F.pad(image, pad_low)[(slice(None), slice(None), *[slice(None, None, 2)] * ndim)]
        return F.pad(image, pad), low


def _normalized(centres: Tensor, shape: Sequence[int]) -> Tensor:
    """Voxel indices ``(..., D)`` as coordinates in [−1, 1] of an image of ``shape``
    (:class:`~learnreg.nn.blocks.AddCoords`' convention)."""
    size = torch.tensor([max(int(s) - 1, 1) for s in shape], device=centres.device)
    return centres.float() / size * 2 - 1


@dataclass
class PatchPredictions:
    """A training-mode forward of a patch network: predictions at sampled voxels only (no
    dense transform; :meth:`RegNet.predict` or eval mode gives one).

    Attributes:
        centres: ``(N, K, D)`` voxel indices of the network grid.
        displacement: ``(N, K, D)`` predicted displacement there, voxels.
    """

    centres: Tensor
    displacement: Tensor


@register_method(
    "regnet",
    year=2017,
    ndim="3D (2D by the same layers)",
    transform="dense displacement",
    loss="mean residual distance to simulated fields",
    supervision="supervised (simulated smooth fields on real images)",
    reference="Sokooti et al., MICCAI 2017",
    aliases=("sokooti", "sokooti2017"),
)
class RegNet(RegistrationMethod):
    """RegNet as a registration method (module docstring).

    Args:
        ndim: 3 (the paper) or 2.
        width: channel multiplier (1.0: the paper's network).
        shared_weights: one stream per scale for both images (siamese) or one per image.
        patches_per_pair: training patch centres sampled per pair.
        foreground: centres are drawn where the fixed image exceeds this fraction of its
            maximum (patches with image content).
        coord_conv: the head also sees each prediction's position in the image
            (:class:`RegNetwork`).
    """

    def __init__(
        self,
        ndim: int = 3,
        width: float = 1.0,
        shared_weights: bool = True,
        patches_per_pair: int = 16,
        foreground: float = 0.1,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"RegNet: ndim must be 2 or 3, got {ndim}")
        if patches_per_pair < 1:
            raise ValueError(f"RegNet: patches_per_pair must be >= 1, got {patches_per_pair}")
        if not 0 <= foreground < 1:
            raise ValueError(f"RegNet: foreground must be in [0, 1), got {foreground}")
        self.net = RegNetwork(ndim, width, shared_weights, coord_conv)
        self.ndim, self.patches_per_pair, self.foreground = ndim, int(patches_per_pair), foreground

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        if fixed.dim() != self.ndim + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"regnet: fixed and moving must both be (N, 1, *S) with {self.ndim} spatial "
                f"sizes; got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )

    def sample_centres(self, fixed: Tensor) -> Tensor:
        """``(N, K, D)`` random voxels of each fixed image's foreground (torch's generator)."""
        centres = []
        for image in fixed[:, 0]:
            mask = image > self.foreground * image.max()
            idx = mask.nonzero() if bool(mask.any()) else torch.ones_like(image).nonzero()
            pick = torch.randint(len(idx), (self.patches_per_pair,), device=idx.device)
            centres.append(idx[pick])
        return torch.stack(centres)

    def predict_at(self, fixed: Tensor, moving: Tensor, centres: Tensor) -> Tensor:
        """The displacement ``(N, K, D)`` (voxels) at ``centres`` ``(N, K, D)``, patch by patch."""
        n, k = centres.shape[:2]
        full = [extract_patches(t, centres, PATCH) for t in (fixed, moving)]
        low = [extract_patches(t, centres, CONTEXT, 2) for t in (fixed, moving)]
        coords = _normalized(centres.reshape(n * k, self.ndim), fixed.shape[2:])
        coords = coords.reshape(n * k, self.ndim, *[1] * self.ndim)
        return self.net(*full, *low, coords).reshape(n, k, self.ndim)

    def forward(
        self, fixed: Tensor, moving: Tensor, grid: Grid | None = None
    ) -> MethodOutput | PatchPredictions:
        self.check_pair(fixed, moving)
        if self.training:
            centres = self.sample_centres(fixed)
            return PatchPredictions(centres, self.predict_at(fixed, moving, centres))
        grid = unit_grid(fixed) if grid is None else grid
        (f, f_low), (m, m_low) = RegNetwork.dense_inputs(fixed), RegNetwork.dense_inputs(moving)
        shape = fixed.shape[2:]
        axes = [torch.arange(0, s + 1, 2, device=fixed.device) for s in shape]  # voxels 0, 2, ...
        centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        coords = (
            _normalized(centres, shape)
            .movedim(-1, 0)[None]
            .expand(len(fixed), -1, *centres.shape[:-1])
        )
        u = self.net(f, m, f_low, m_low, coords)  # at voxels 0, 2, 4, ... of the grid
        coarse = Grid(u.shape[2:], tuple(2 * s for s in grid.spacing), grid.origin, grid.direction)
        return MethodOutput(DisplacementField(coarse, u / 2), grid, moving)

    def target(self, batch: RegistrationBatch) -> Tensor:
        """``batch.target``: the true displacement ``(N, D, *S)`` in voxels of the grid."""
        return dense_target(batch, self.ndim, "regnet")

    def loss(
        self, batch: RegistrationBatch, output: MethodOutput | PatchPredictions
    ) -> dict[str, Tensor]:
        target = self.target(batch)
        if isinstance(output, PatchPredictions):
            c = output.centres
            n = torch.arange(c.shape[0], device=c.device)[:, None].expand(c.shape[:2])
            true = target.movedim(1, -1)[(n, *c.unbind(-1))]  # (N, K, D)
            residual = (output.displacement - true).norm(dim=-1).mean()
        else:
            residual = endpoint_error(output.displacement, target).mean()
        return {"total": residual, "residual": residual.detach()}

    def transform_error(self, batch: RegistrationBatch, output: MethodOutput) -> Tensor:
        """End-point error per pair ``(N,)`` of the dense prediction, voxels."""
        return endpoint_error(output.displacement, self.target(batch))
