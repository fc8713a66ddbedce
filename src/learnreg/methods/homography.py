"""Networks that regress a homography (the 4-corner parameterization) from an image pair.

* ``homography-net`` (DeTone, Malisiewicz and Rabinovich, "Deep Image Homography
  Estimation", RSS workshop / arXiv:1606.03798, 2016): a VGG-style two-channel network
  (eight ``conv 3×3 → BN → ReLU`` layers of 64, 64, 64, 64, 128, 128, 128, 128 channels, 2×2
  max pooling after every two but the last pair, dropout 0.5, FC 1024, FC 8) on the
  channel-stacked patches regresses the eight corner offsets ``H_4pt``; supervised,
  Euclidean (L2) loss against the known offsets. ``head: classification`` is DeTone's
  classification network: the same trunk, each offset coordinate quantized into 21 bins,
  cross-entropy, a confidence per corner.
* ``homography-unsupervised`` (Nguyen, Chen, Shivakumar, Taylor and Kumar, "Unsupervised
  Deep Homography", IEEE RA-L 2018): the same network; its corner offsets go through a
  differentiable direct linear transform (:meth:`learnreg.spatial.homography.Homography.
  from_corners`) to the 3×3 matrix, a spatial transformer warps the moving patch, and the
  loss is the photometric L1 distance to the fixed patch — no ground truth.
* ``homography-hierarchical`` (Nowruzi, Laganière and Japkowicz, "Homography Estimation
  from Image Pairs with Hierarchical Convolutional Networks", ICCV workshops 2017): a stack
  of twin (siamese) modules; module ``k`` sees the fixed patch and the moving patch re-warped
  by the homography accumulated by modules ``1 … k−1`` and regresses the residual corner
  offsets; supervised, L2 on each module's residual against the true residual.

Conventions (``ARCHITECTURE.md``, :mod:`learnreg.data.synthetic`): the corner offsets ``δ``
``(N, 4, 2)`` are those of the fixed→moving homography ``T`` of index points of the network
grid at the patch corners :func:`patch_corners` (voxel centres, index ``(i, j)`` order, voxel
units), ``T(c_k) = c_k + δ_k``. ``forward`` returns ``T`` on world points,
``Homography.from_matrix(index_matrix_to_world(H, grid))``; its dense displacement on the grid
and ``moving ∘ T`` are derived from it (:class:`~learnreg.methods.base.MethodOutput`).
``extras``: ``"corners"`` (δ), ``"homography"`` (the index-space matrices ``(N, 3, 3)``,
``H[2, 2] = 1``) and, for the hierarchy, ``"residuals"`` ``(N, K, 4, 2)``,
``"module_corners"`` (the accumulated δ after each module) and ``"priors"`` (the accumulated
index-space matrix each module's input was warped with).

Scaled down for CPUs (documented, configurable): the defaults are half of DeTone's sizes —
64×64 patches (DeTone: 128×128), channels 32/64 (64/128), FC 512 (1024); passing DeTone's
values reproduces the paper's network. The networks take a fixed input size (fully
connected head): ``patch_size``. Outputs are scaled by ``offset_scale`` pixels (default
``patch_size / 4``, DeTone's ρ = 32 for 128-pixel patches) so that the head regresses values
of order one, and the L2 loss is computed on offsets in units of ``offset_scale``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.regression import ParameterRegressor
from learnreg.spatial.frame import index_matrix_to_world
from learnreg.spatial.homography import Homography
from learnreg.spatial.sampling import sample_index, warp

__all__ = [
    "patch_corners",
    "corner_error",
    "corners_to_homography",
    "HomographyNet",
    "UnsupervisedHomographyNet",
    "HierarchicalHomographyNet",
]

_DEFAULT_FEATURES = (32, 32, 32, 32, 64, 64, 64, 64)
HEADS = ("regression", "classification")


# ---------------------------------------------------------------------------- helpers
def patch_corners(size: int | Sequence[int], dtype=torch.float32, device=None) -> Tensor:
    """The 4 corners ``(4, 2)`` of a patch of ``size`` voxels in DeTone's cyclic order: voxel
    centres ``(0, 0), (0, W−1), (H−1, W−1), (H−1, 0)``, index ``(i, j)`` order (the corners
    of ``Grid(size).index_lattice(2)``). The one definition of the 4-point parameterization,
    shared with :mod:`learnreg.data.synthetic`."""
    shape = (int(size),) * 2 if isinstance(size, int) else tuple(int(s) for s in size)
    return Grid(shape).index_lattice(2, dtype, device)[[0, 1, 3, 2]]


def corner_error(predicted: Tensor, target: Tensor) -> Tensor:
    """Mean corner error per pair ``(N,)``: mean over the 4 corners of the Euclidean distance
    between predicted and true corner offsets (``(N, 4, 2)`` or ``(N, 8)``), in their units."""
    p, t = predicted.reshape(-1, 4, 2), target.reshape(-1, 4, 2)
    if p.shape != t.shape:
        raise ValueError(
            f"corner_error: predicted {tuple(predicted.shape)} and target "
            f"{tuple(target.shape)} must both hold (N, 4, 2) corner offsets"
        )
    return (p - t).norm(dim=-1).mean(dim=-1)


def corners_to_homography(offsets: Tensor, size: int | Sequence[int]) -> Homography:
    """The homography mapping the patch corners ``c`` to ``c + offsets`` (``(N, 4, 2)``):
    the (differentiable, Hartley-normalized) direct linear transform."""
    c = patch_corners(size, offsets.dtype, offsets.device)[None].expand(offsets.shape[0], 4, 2)
    return Homography.from_corners(c, c + offsets)


def _standardized(x: Tensor) -> Tensor:
    """Each image of ``x`` ``(N, C, H, W)`` at zero mean and unit variance."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / std.clamp_min(1e-6)


def _patch_size(value: int | Sequence[int]) -> tuple[int, int]:
    size = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(size) != 2 or any(s < 2 for s in size):
        raise ValueError(f"patch_size must be an int or (rows, cols) >= 2, got {value!r}")
    return size  # type: ignore[return-value]


# ---------------------------------------------------------------------------- base
class _CornerRegression(RegistrationMethod):
    """Shared pieces: input checks, the output from corner offsets, target handling."""

    patch: tuple[int, int]
    offset_scale: float

    def _setup(self, patch_size: int | Sequence[int], offset_scale: float | None) -> None:
        self.patch = _patch_size(patch_size)
        scale = min(self.patch) / 4 if offset_scale is None else float(offset_scale)
        if not scale > 0:
            raise ValueError(f"offset_scale must be > 0, got {offset_scale}")
        self.offset_scale = scale
        self.resolve(offset_scale=scale)

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        if (
            fixed.dim() != 4
            or fixed.shape != moving.shape
            or fixed.shape[1] != 1
            or tuple(fixed.shape[2:]) != self.input_shape
        ):
            h, w = self.input_shape
            raise ValueError(
                f"{self.name or type(self).__name__}: fixed and moving must both be 2D patches "
                f"(N, 1, {h}, {w}) (patch_size + 2 context); got "
                f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
            )

    def target_offsets(self, batch: RegistrationBatch) -> Tensor:
        """``batch.target`` as ``(N, 4, 2)`` corner offsets (raises if absent or malformed)."""
        t = batch.target
        n = batch.fixed.shape[0]
        if t is None:
            raise ValueError(
                f"{self.name}: supervised; the batch needs target = the (N, 4, 2) corner "
                f"offsets (e.g. from learnreg.data.synthetic.HomographyPairs)"
            )
        if t.shape not in ((n, 4, 2), (n, 8)):
            raise ValueError(
                f"{self.name}: target must be (N, 4, 2) or (N, 8) corner offsets with "
                f"N = {n}; got {tuple(t.shape)}"
            )
        return t.reshape(n, 4, 2).to(batch.fixed.dtype)

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.patch

    def output(
        self, moving: Tensor, matrix: Tensor, extras: dict, grid: Grid | None = None
    ) -> MethodOutput:
        """The :class:`MethodOutput` of homographies ``matrix (N, 3, 3)`` of index points of
        ``grid`` (default: the unit grid of :attr:`input_shape`): the world homography
        ``G H G⁻¹``, with the corner offsets of ``matrix`` at the grid's corners in
        ``extras``."""
        grid = Grid(self.input_shape) if grid is None else grid
        c = patch_corners(self.input_shape, matrix.dtype, matrix.device)[None]
        corners = Homography.from_matrix(matrix)(c.expand(matrix.shape[0], 4, 2)) - c
        extras = {"corners": corners, "homography": matrix, **extras}
        transform = Homography.from_matrix(index_matrix_to_world(matrix, grid))
        return MethodOutput(transform, grid, moving, extras)

    def transform_error(self, batch: RegistrationBatch, output: MethodOutput) -> Tensor:
        """Mean corner error per pair ``(N,)``, voxels of the network grid."""
        return corner_error(output.extras["corners"], self.target_offsets(batch))

    def _regressor(
        self,
        mode,
        features,
        hidden,
        dropout,
        norm,
        pooling,
        coord_conv,
        split,
        head_norm=None,
        outputs: int = 8,
    ):
        feats = [int(f) for f in features]
        if len(feats) < 1:
            raise ValueError("features must not be empty")
        # downsample after every second conv block except the last pair (HomographyNet)
        down = [i for i in range(1, len(feats) - 2, 2)]
        enc: dict = {"mode": mode, "pooling": pooling, "norm": norm, "coord_conv": coord_conv}
        if split is None:
            enc.update(features=feats, downsample_after=down)
        else:  # twin towers for the first `split` blocks, a merged trunk for the rest
            enc.update(
                features=feats[:split],
                downsample_after=[i for i in down if i < split],
                merge_features=feats[split:],
                merge_downsample_after=[i - split for i in down if i >= split],
            )
        head = {"hidden": hidden, "dropout": dropout, "init_std": 1e-3, "norm": head_norm}
        return ParameterRegressor(2, self.patch, outputs, enc, head)


# ---------------------------------------------------------------------------- methods
@register_method(
    "homography-net",
    year=2016,
    ndim="2D",
    transform="homography (4 corners)",
    loss="L2 on corner offsets (or cross-entropy on quantized offsets)",
    supervision="supervised (synthetic homographies)",
    reference="DeTone et al., arXiv:1606.03798 (RSS workshop 2016)",
    aliases=("homographynet", "detone"),
)
class HomographyNet(_CornerRegression):
    """HomographyNet: VGG-style two-channel regression of the 4 corner offsets, L2 loss.

    Args:
        patch_size: input size (int or (rows, cols)); DeTone: 128 (default 64 for CPUs).
        features: channels of the conv blocks; max pooling after every two but the last
            pair; DeTone: ``(64, 64, 64, 64, 128, 128, 128, 128)`` (default: half).
        hidden: fully connected layers before the output (DeTone: ``(1024,)``).
        dropout: before and after the hidden layers (DeTone: 0.5).
        norm: None or ``"batch"`` (DeTone) / ``"instance"`` / ``"group"``.
        pooling: ``"max"`` (DeTone), ``"avg"``, ``"stride"``.
        coord_conv: CoordConv first layer (for ablations).
        offset_scale: the head's unit in pixels (default ``patch_size / 4``).
        standardize, head_norm: per-patch input standardization and batch normalization of
            the hidden fully connected layers, as :class:`HierarchicalHomographyNet` (off by
            default here: the two-channel network trains reliably without them).
        head: ``"regression"`` (DeTone's regression network: 8 offsets, L2 loss) or
            ``"classification"`` (DeTone's classification network: each of the 8 offset
            coordinates quantized into ``bins`` bins over ``[−offset_scale, offset_scale]``,
            a softmax per coordinate, cross-entropy to the bin of the true offset; the
            prediction is the centre of the most probable bin, and ``extras["confidence"]``
            ``(N, 4)`` the product of the two coordinates' top probabilities per corner,
            DeTone's per-corner confidence).
        bins: quantization bins per coordinate (DeTone: 21).
    """

    def __init__(
        self,
        patch_size: int | Sequence[int] = 64,
        features: Sequence[int] = _DEFAULT_FEATURES,
        hidden: Sequence[int] = (512,),
        dropout: float = 0.5,
        norm: str | None = "batch",
        pooling: str = "max",
        coord_conv: bool = False,
        offset_scale: float | None = None,
        standardize: bool = False,
        head_norm: str | None = None,
        head: str = "regression",
        bins: int = 21,
    ) -> None:
        super().__init__()
        check_option("head", head, HEADS)
        if head == "classification" and int(bins) < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self._setup(patch_size, offset_scale)
        self.standardize = bool(standardize)
        self.head, self.bins = head, int(bins)
        outputs = 8 if head == "regression" else 8 * self.bins
        self.net = self._regressor(
            "two-channel",
            features,
            hidden,
            dropout,
            norm,
            pooling,
            coord_conv,
            None,
            head_norm,
            outputs,
        )

    def bin_centres(self, dtype=None, device=None) -> Tensor:
        """Offsets (pixels) of the ``bins`` quantization bins, ``−offset_scale`` to
        ``offset_scale``."""
        return torch.linspace(-1.0, 1.0, self.bins, dtype=dtype, device=device) * self.offset_scale

    def target_bins(self, offsets: Tensor) -> Tensor:
        """The bin ``(N, 8)`` (int64) of each offset coordinate (clamped to the range)."""
        t = (offsets.reshape(offsets.shape[0], 8) / self.offset_scale).clamp(-1, 1)
        return torch.round((t + 1) / 2 * (self.bins - 1)).long()

    def predict_corners(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """Corner offsets ``(N, 4, 2)`` in pixels."""
        return self._predict(fixed, moving)[0]

    def _predict(self, fixed: Tensor, moving: Tensor) -> tuple[Tensor, dict]:
        if self.standardize:
            fixed, moving = _standardized(fixed), _standardized(moving)
        raw = self.net(fixed, moving)
        if self.head == "regression":
            return raw.view(-1, 4, 2) * self.offset_scale, {}
        logits = raw.view(-1, 8, self.bins)
        prob = logits.softmax(-1)
        top, index = prob.max(-1)
        offsets = self.bin_centres(raw.dtype, raw.device)[index].view(-1, 4, 2)
        confidence = top.view(-1, 4, 2).prod(-1)
        return offsets, {"logits": logits, "confidence": confidence}

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        self.check_pair(fixed, moving)
        offsets, extras = self._predict(fixed, moving)
        h = corners_to_homography(offsets, self.patch).homogeneous()
        out = self.output(moving, h, extras, unit_grid(fixed) if grid is None else grid)
        out.extras["corners"] = offsets  # exactly the predicted values
        return out

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        target = self.target_offsets(batch)
        pred = output.extras["corners"]
        error = corner_error(pred, target).mean().detach()
        if self.head == "classification":
            logits = output.extras["logits"]
            ce = F.cross_entropy(logits.reshape(-1, self.bins), self.target_bins(target).flatten())
            return {"total": ce, "cross_entropy": ce, "corner_error": error}
        l2 = ((pred - target) / self.offset_scale).square().mean()
        return {"total": l2, "l2": l2, "corner_error": error}


@register_method(
    "homography-unsupervised",
    year=2018,
    ndim="2D",
    transform="homography (4 corners → DLT)",
    loss="photometric L1",
    supervision="unsupervised",
    reference="Nguyen et al., IEEE RA-L 2018",
    aliases=("unsupervised-homography", "nguyen"),
)
class UnsupervisedHomographyNet(HomographyNet):
    """Unsupervised deep homography: corner offsets → differentiable DLT → spatial
    transformer; photometric L1 loss.

    Arguments as :class:`HomographyNet`. Nguyen et al. warp the whole image ``I_A`` and crop,
    so every pixel of the fixed patch has a partner; with only the moving patch at hand the L1
    is averaged over the fixed pixels whose mapped point falls inside the moving patch (a
    mask: the warped patch of ones, not differentiated). ``batch.target``, when present, is
    only reported (``corner_error``), never used in the loss.

    ``standardize`` and ``head_norm`` are on by default here (the network still sees the
    patches standardized; the photometric loss compares the images as given). Measured on the
    tests' protocol (400 Adam steps of 16 at 1e-3, 32×32 photo pairs, held-out corner error /
    identity): without them 0.945, 0.986, 0.986 for seeds 0, 1, 2 — the photometric signal
    barely moves the head before its hidden units die (:class:`HierarchicalHomographyNet`);
    with them 0.885, 0.883, 0.875.
    """

    def __init__(
        self,
        patch_size: int | Sequence[int] = 64,
        features: Sequence[int] = _DEFAULT_FEATURES,
        hidden: Sequence[int] = (512,),
        dropout: float = 0.5,
        norm: str | None = "batch",
        pooling: str = "max",
        coord_conv: bool = False,
        offset_scale: float | None = None,
        standardize: bool = True,
        head_norm: str | None = "batch",
    ) -> None:
        super().__init__(
            patch_size,
            features,
            hidden,
            dropout,
            norm,
            pooling,
            coord_conv,
            offset_scale,
            standardize,
            head_norm,
        )

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        with torch.no_grad():
            mask = warp(torch.ones_like(batch.moving), output.displacement)
        l1 = (mask * (output.warped - batch.fixed).abs()).sum() / mask.sum().clamp(min=1.0)
        out = {"total": l1, "l1": l1}
        if batch.target is not None:
            out["corner_error"] = corner_error(
                output.extras["corners"].detach(), self.target_offsets(batch)
            ).mean()
        return out


@register_method(
    "homography-hierarchical",
    year=2017,
    ndim="2D",
    transform="homography (stacked residual 4 corners)",
    loss="L2 on residual corner offsets (per module)",
    supervision="supervised (synthetic homographies)",
    reference="Nowruzi et al., ICCV workshops 2017",
    aliases=("hierarchical-homography", "nowruzi"),
)
class HierarchicalHomographyNet(_CornerRegression):
    """Stacked twin (siamese) networks, each refining the residual homography on the re-warped
    moving patch.

    Args:
        levels: number of stacked modules (Nowruzi et al. used up to 4; default 2 for CPUs).
        patch_size, hidden, dropout, norm, pooling, coord_conv, offset_scale: as
            :class:`HomographyNet`.
        features: conv blocks of one module: the first ``tower_depth`` form the twin tower
            applied to each image with shared weights, the rest a trunk on the concatenated
            features (HomographyNet's layout split in two).
        tower_depth: number of conv blocks in each twin tower.
        residual_scale: module ``k`` regresses in units of
            ``offset_scale × residual_scale**k`` pixels (the residuals shrink; its loss is
            computed in those units).
        siamese: share the towers' weights (True, Nowruzi) or not (pseudo-siamese).
        standardize: each module sees both patches standardized to zero mean and unit
            variance (per patch).
        head_norm: ``"batch"``: batch normalization of the fully connected hidden layers
            (before their ReLU), or None.
        trainable_levels: modules to train (0-based; default all): :meth:`set_trainable_levels`
            from the config, so that ``learnreg train`` runs Nowruzi's stage-wise schedule
            (stage ``k`` with ``trainable_levels: [k]`` and ``init:`` the previous stage's
            checkpoint).
        context: voxels of image around the patch on every side (default 0): the network
            grid is ``patch_size + 2 context`` and the patch its centre. Each module's moving
            patch is re-cropped through the accumulated homography from that whole moving
            image, as Nowruzi et al. re-crop from the full image, so it has no black borders
            where the homography reaches outside the patch (train on
            ``data.synthetic: {kind: homography, context: ...}``).
        recrop: with ``context``, re-crop from the whole moving image (True, Nowruzi) or
            re-warp the moving patch alone with zero padding (False: this class's behaviour
            before ``context``; for ablation). Without context the two are the same.

    Re-crop against re-warp (measured, ``benchmarks/homography_recrop.py --steps 1200``: one
    run, 128-px patches, ρ = 32, 4× downsampled, 24 px of context; module 1 trained once for
    1200 steps of 32, then module 2 for 600 steps each way; 500 held-out photo pairs / 200
    brain-slice pairs, mean corner error in px): module 1 alone 19.33 / 9.38; with a
    re-cropping module 2, **16.61** / **7.59**; with a re-warping one, 19.23 / 9.14 (paired
    difference −2.62 px [−2.90, −2.36] on photos). Re-warping, the second module barely
    learns (the black borders carry the residual's cue); re-cropping it does. Train with
    ``context`` (``data.synthetic: {kind: homography, context: 24}`` and the matching
    ``context: 6`` here); ``context: 0`` keeps the 32×32-input network of earlier models.

    Reliability at CPU scale (measured, 400 Adam steps of 16 at 1e-3 on the 32×32 photo
    pairs of the tests): with plain [0, 1] inputs and no normalization in the head, the twin
    module's loss stays at the identity's for 2 of 3 seeds (held-out corner error / identity
    1.002 and 1.006 for seeds 1 and 2; 0.81 for seed 0) while the Adam-driven noise of the
    near-zero output layer kills its hidden ReLUs (all but 0–3 % of the 128 units dead after
    100 steps; the units die the same way in HomographyNet, whose early fusion still learns
    through the few left). Keeping the units alive (``head_norm``) alone, or standardized
    inputs alone, does not help (≥ 0.99 for seeds 1 and 2); the two together make every
    seed learn (0.80 and 0.78 for seeds 1 and 2 after 400 steps). Patch standardization is
    the usual input normalization of these networks (DeTone et al. feed normalized grayscale
    patches); Nowruzi et al. do not detail their fully connected layers, and batch
    normalization after every layer is the HomographyNet family's recipe. Both are options
    (``standardize=False, head_norm=None`` restores the plain module).

    Modules are separated by stopped gradients: module ``k``'s input (the moving patch warped
    by the detached accumulated homography) and loss (its own residual) depend only on its
    own weights, as in Nowruzi et al., who train the modules one after another.
    :meth:`set_trainable_levels` freezes all but chosen modules (their weights and batch-norm
    statistics) to reproduce that sequential schedule; by default all train at once.
    """

    def __init__(
        self,
        levels: int = 2,
        patch_size: int | Sequence[int] = 64,
        features: Sequence[int] = _DEFAULT_FEATURES,
        tower_depth: int = 4,
        hidden: Sequence[int] = (512,),
        dropout: float = 0.5,
        norm: str | None = "batch",
        pooling: str = "max",
        coord_conv: bool = False,
        offset_scale: float | None = None,
        residual_scale: float = 0.5,
        siamese: bool = True,
        standardize: bool = True,
        head_norm: str | None = "batch",
        trainable_levels: Sequence[int] | None = None,
        context: int = 0,
        recrop: bool = True,
    ) -> None:
        super().__init__()
        if int(context) < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        self.context, self.recrop = int(context), bool(recrop)
        if int(levels) < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if not 0 < int(tower_depth) < len(features):
            raise ValueError(
                f"tower_depth must be in [1, len(features) - 1 = {len(features) - 1}], "
                f"got {tower_depth}"
            )
        if not residual_scale > 0:
            raise ValueError(f"residual_scale must be > 0, got {residual_scale}")
        self._setup(patch_size, offset_scale)
        self.levels, self.residual_scale = int(levels), float(residual_scale)
        mode = "siamese" if siamese else "pseudo-siamese"
        self.stages = nn.ModuleList(
            self._regressor(
                mode,
                features,
                hidden,
                dropout,
                norm,
                pooling,
                coord_conv,
                int(tower_depth),
                head_norm,
            )
            for _ in range(self.levels)
        )
        self.standardize = bool(standardize)
        self.trainable_levels: tuple[int, ...] = tuple(range(self.levels))
        if trainable_levels is not None:
            self.set_trainable_levels(trainable_levels)

    @property
    def input_shape(self) -> tuple[int, int]:
        return (self.patch[0] + 2 * self.context, self.patch[1] + 2 * self.context)

    def _shift(self, like: Tensor) -> Tensor:
        """Index homography ``(3, 3)`` from patch to network grid: ``u ↦ u + context``."""
        shift = torch.eye(3, dtype=like.dtype, device=like.device)
        shift[:2, 2] = self.context
        return shift

    def level_scale(self, k: int) -> float:
        return self.offset_scale * self.residual_scale**k

    def set_trainable_levels(self, levels: Iterable[int]) -> None:
        """Train only modules ``levels`` (0-based); the others keep their weights and run in
        eval mode (batch-norm statistics frozen)."""
        chosen = tuple(sorted({int(k) for k in levels}))
        if not chosen or any(not 0 <= k < self.levels for k in chosen):
            raise ValueError(f"levels must be a non-empty subset of 0..{self.levels - 1}")
        self.trainable_levels = chosen
        for k, stage in enumerate(self.stages):
            stage.requires_grad_(k in chosen)
        self.train(self.training)

    def train(self, mode: bool = True) -> HierarchicalHomographyNet:
        super().train(mode)
        for k, stage in enumerate(self.stages):
            if k not in self.trainable_levels:
                stage.eval()
        return self

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        self.check_pair(fixed, moving)
        n, (h, w), m = fixed.shape[0], self.patch, self.context
        patch_fixed = fixed[..., m : m + h, m : m + w]
        patch_moving = moving[..., m : m + h, m : m + w]
        # homographies act on patch index points u; the network grid's index is u + context
        points = Grid(self.patch).index_points(fixed.dtype, fixed.device)
        points = points.reshape(1, -1, 2).expand(n, -1, 2)
        eye = torch.eye(3, dtype=fixed.dtype, device=fixed.device)
        acc = eye.expand(n, 3, 3)
        residuals, accumulated, inputs = [], [], []
        shift = self._shift(fixed)
        c = patch_corners(self.input_shape, fixed.dtype, fixed.device)[None].expand(n, 4, 2)
        for k, stage in enumerate(self.stages):
            prior = acc.detach()
            if k == 0:
                warped_k = patch_moving
            elif self.recrop:  # re-crop from the whole moving image
                at = Homography.from_matrix(prior)(points) + m
                warped_k = sample_index(moving, at.view(n, h, w, 2))
            else:  # re-warp the moving patch alone
                disp = Homography.from_matrix(prior).voxel_displacement(Grid(self.patch))
                warped_k = warp(patch_moving, disp)
            if self.standardize:
                res = stage(_standardized(patch_fixed), _standardized(warped_k))
            else:
                res = stage(patch_fixed, warped_k)
            res = res.view(n, 4, 2) * self.level_scale(k)
            r = corners_to_homography(res, self.patch).homogeneous()
            acc = prior @ r  # x ↦ prior(r(x)): the residual acts first, on the fixed grid
            acc = acc / acc[:, 2:, 2:]
            residuals.append(res)
            on_grid = shift @ acc @ torch.linalg.inv(shift)
            accumulated.append(Homography.from_matrix(on_grid)(c) - c)
            inputs.append(prior)
        extras = {
            "residuals": torch.stack(residuals, 1),
            "module_corners": torch.stack(accumulated, 1),
            "priors": torch.stack(inputs, 1),
        }
        on_grid = shift @ acc @ torch.linalg.inv(shift)
        return self.output(moving, on_grid, extras, unit_grid(fixed) if grid is None else grid)

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        target = self.target_offsets(batch)
        n = target.shape[0]
        grown = patch_corners(self.input_shape, target.dtype, target.device)[None]
        grown = grown.expand(n, 4, 2)
        true = Homography.from_corners(grown, grown + target).homogeneous()
        shift = self._shift(target)
        true = torch.linalg.inv(shift) @ true @ shift  # on patch index points
        c = patch_corners(self.patch, target.dtype, target.device)[None].expand(n, 4, 2)
        out: dict[str, Tensor] = {}
        total = target.new_zeros(())
        for k in range(self.levels):
            prior = output.extras["priors"][:, k]
            # true residual: prior⁻¹ ∘ T*, the map module k should regress
            residual = Homography.from_matrix(torch.linalg.inv(prior) @ true)(c) - c
            pred = output.extras["residuals"][:, k]
            l2 = ((pred - residual) / self.level_scale(k)).square().mean()
            out[f"l2_{k}"] = l2
            if k in self.trainable_levels:
                total = total + l2
            out[f"corner_error_{k}"] = corner_error(
                output.extras["module_corners"][:, k].detach(), target
            ).mean()
        out["corner_error"] = out[f"corner_error_{self.levels - 1}"]
        return {"total": total, **out}
