"""VoxelMorph and its probabilistic and weakly supervised variants: one implementation.

* ``voxelmorph`` (Balakrishnan et al., CVPR 2018 / IEEE TMI 2019): a U-Net on the
  concatenated (moving, fixed) pair predicts a dense displacement (or, with
  ``integration_steps > 0``, a stationary velocity integrated by scaling and squaring, as
  VoxelMorph-diff's "diffeomorphic" option); a spatial transformer warps the moving image;
  loss = image similarity (LNCC or MSE) + ``reg_weight`` × diffusion of the predicted field.
* ``voxelmorph-diff`` (Dalca et al., MICCAI 2018 / MedIA 2019): the network predicts the mean
  and log-variance of a stationary velocity on a half-resolution grid; training samples
  ``v = μ + σ ε``; loss = ``1/(2 σ_I²)`` MSE + the KL divergence to a Laplacian smoothness
  prior (see :func:`kl_divergence`).
* ``voxelmorph-weakly`` (label-driven, Hu et al. 2018; VoxelMorph's auxiliary segmentation
  loss): the same network, trained with a soft Dice of warped one-hot moving labels against
  the fixed labels (+ optional image similarity + diffusion). Labels are used only by
  :meth:`~VoxelMorph.loss`; :meth:`~VoxelMorph.forward` never needs them.

All fields are in voxel units of the grid they live on, fixed→moving (``ARCHITECTURE.md``).

Loss terms are declared by name through the loss registry (:class:`~learnreg.losses.LossTerms`),
e.g. in a training config::

    method: voxelmorph
    method_config:
      similarity: {lncc: {window: 9}}    # or a name (mse), or several weighted terms
      regularization: {diffusion: 1.0}   # name: weight, or name: {weight: .., options..}

The older keys (``similarity: lncc``, ``window``, ``reg_weight``) mean the same and still work:
``similarity: lncc, window: 5, reg_weight: 1.0`` is ``similarity: {lncc: {window: 5}},
regularization: {diffusion: 1.0}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.losses.modules import MSELoss, loss_class
from learnreg.losses.terms import LossSpec, LossTerms
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.blocks import FlowHead
from learnreg.nn.unet import UNet
from learnreg.spatial.base import SpatialTransform
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.sampling import warp
from learnreg.spatial.svf import StationaryVelocityField

__all__ = [
    "SIMILARITIES",
    "VoxelMorph",
    "VoxelMorphDiff",
    "VoxelMorphWeakly",
    "degree_matrix",
    "kl_divergence",
    "one_hot_union",
]

SIMILARITIES = ("lncc", "mse")
"""The similarity losses of the VoxelMorph papers, the ones the methods accept (with their
registry aliases: ``cc``, ``lcc``, ``local_ncc``, ``ssd``)."""
LABEL_LOSSES = ("dice", "multiscale_dice")
"""The label losses of the papers (any registered label loss is accepted)."""
_RESERVED_TERMS = ("similarity", "dice", "kl", "total")


# ---------------------------------------------------------------------------- KL of vxm-diff
def degree_matrix(shape: Sequence[int], dtype=None, device=None) -> Tensor:
    """Number of grid neighbours (±1 along each axis, inside the grid) of every voxel, ``(*S)``:
    the diagonal ``D`` of the graph Laplacian ``L = D − A`` of VoxelMorph-diff's prior."""
    deg = torch.zeros(tuple(shape), dtype=dtype, device=device)
    for axis, n in enumerate(shape):
        if n < 2:
            continue
        count = torch.full((n,), 2.0, dtype=dtype, device=device)
        count[0] = count[-1] = 1.0
        deg = deg + count.view(*([1] * axis), n, *([1] * (len(shape) - axis - 1)))
    return deg


def kl_divergence(mean: Tensor, log_variance: Tensor, prior_lambda: float) -> Tensor:
    """KL term of VoxelMorph-diff (Dalca et al. 2019, Eq. 5), as VoxelMorph's ``losses.KL``.

    The posterior is ``q(v) = N(μ, Σ)`` with diagonal ``Σ = exp(log_variance)``; the prior is
    ``p(v) = N(0, Λ⁻¹)`` with precision ``Λ = λ L`` (``L = D − A`` the grid graph Laplacian,
    ``λ`` = ``prior_lambda``). Up to constants::

        KL = ½ [ tr(λ D Σ − log Σ) + λ μᵀ L μ ],   μᵀ L μ = Σ_{neighbours i~j} (μ_i − μ_j)²

    Normalized exactly as VoxelMorph's implementation: with ``d`` spatial dims,
    ``KL = ½ d (mean(λ D exp(logσ²) − logσ²) + λ · ½ Σ_axes mean((Δ_axis μ)²) / d)``, means over
    batch, components and voxels (forward differences inside the grid). Fields ``(N, d, *S)``.
    """
    d = mean.dim() - 2
    if mean.shape != log_variance.shape or d not in (2, 3) or mean.shape[1] != d:
        raise ValueError(
            f"kl_divergence: mean and log_variance must both be (N, D, *S) with D = 2 or 3; "
            f"got {tuple(mean.shape)} and {tuple(log_variance.shape)}"
        )
    deg = degree_matrix(mean.shape[2:], mean.dtype, mean.device)
    sigma_term = (prior_lambda * deg * log_variance.exp() - log_variance).mean()
    smooth = sum((torch.diff(mean, dim=a + 2) ** 2).mean() for a in range(d))
    prec_term = prior_lambda * 0.5 * smooth / d
    return 0.5 * d * (sigma_term + prec_term)


# ---------------------------------------------------------------------------- labels
def one_hot_union(
    fixed_labels: Tensor, moving_labels: Tensor, include_background: bool = False
) -> tuple[Tensor, Tensor]:
    """One-hot ``(N, L, *S)`` float maps of two label maps ``(N, 1, *S)`` over the union of
    their values (sorted; label 0 dropped unless ``include_background``). ``L`` may be 0."""
    values = torch.unique(torch.cat([fixed_labels.flatten(), moving_labels.flatten()]))
    if not include_background:
        values = values[values != 0]
    shape = (1, -1) + (1,) * (fixed_labels.dim() - 2)
    v = values.view(shape)
    return (fixed_labels == v).float(), (moving_labels == v).float()


# ---------------------------------------------------------------------------- methods
@register_method(
    "voxelmorph",
    year=2018,
    ndim="2D/3D",
    transform="dense displacement (or SVF)",
    loss="LNCC/MSE + diffusion",
    supervision="unsupervised",
    reference="Balakrishnan et al., CVPR 2018 / IEEE TMI 2019",
    aliases=("vxm",),
)
class VoxelMorph(RegistrationMethod):
    """VoxelMorph: U-Net on (moving, fixed) → dense displacement, spatial transformer warp.

    Args:
        ndim: 2 or 3 spatial dimensions.
        enc_features, dec_features, norm, coord_conv: the :class:`~learnreg.nn.unet.UNet`
            (VoxelMorph-2 defaults); input sizes must be divisible by ``2**len(enc_features)``.
        similarity: the image term: a similarity loss by registry name (the papers'
            ``"lncc"`` or ``"mse"``, :data:`SIMILARITIES`) or a spec of named weighted terms
            of them (:mod:`learnreg.losses.terms`), e.g. ``{"lncc": {"window": 9}}`` or
            ``{"lncc": {"window": 5}, "mse": 0.1}``. The loss dict's ``"similarity"`` is their
            weighted sum (and ``"similarity_<name>"`` each term's value when there are
            several).
        window: window of a similarity given by name (LNCC; odd); None: the loss's default
            (LNCC: 9). Ignored for losses without a window; with a spec, give it in the spec.
        reg_weight: weight λ of the diffusion regularizer when ``regularization`` is not
            given; default 1.0, or 0.01 when the similarity is MSE alone (the paper's
            values). ``create_method`` also accepts the key ``"lambda"``.
        regularization: regularizers of the network's field by name and weight, e.g.
            ``{"diffusion": 1.0}`` or ``{"diffusion": 0.5, "bending": {"weight": 0.1}}``
            (registered ``regularizer`` losses; each term's value is in the loss dict by its
            name); replaces ``reg_weight``. ``{}``: none.
        bidirectional: also warp the fixed image by the backward field (``exp(−v)`` with
            integration, else the negated displacement, as VoxelMorph's ``bidir``) and use
            ``½ sim(fixed, moving∘φ) + ½ sim(moving, fixed∘φ⁻¹)``.
        integration_steps: 0 for a plain displacement; ``n > 0`` treats the network output as
            a stationary velocity integrated by ``n`` scaling-and-squaring steps.
        int_downsize: predict (and integrate) the field on a grid ``int_downsize`` times
            coarser, then upsample it (:func:`~learnreg.spatial.fields.resize_displacement`).

    The diffusion term is computed on the field the network predicts (velocity or coarse
    displacement) in voxel units of its grid; first derivatives in voxel units do not depend
    on that grid's resolution.
    """

    config_aliases = {"lambda": "reg_weight"}

    def __init__(
        self,
        ndim: int = 3,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        similarity: LossSpec = "lncc",
        window: int | None = None,
        reg_weight: float | None = None,
        regularization: LossSpec = None,
        bidirectional: bool = False,
        integration_steps: int = 0,
        int_downsize: int = 1,
        norm: str | None = None,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        check_option("ndim", ndim, (2, 3))
        if integration_steps < 0:
            raise ValueError(f"integration_steps must be >= 0, got {integration_steps}")
        if int_downsize < 1:
            raise ValueError(f"int_downsize must be >= 1, got {int_downsize}")
        self.ndim = ndim
        self.similarity = similarity
        self.similarity_terms = self.build_similarity(similarity, window)
        self.window = None if window is None else int(window)
        if regularization is not None and reg_weight is not None:
            raise ValueError(
                "give regularization (e.g. {diffusion: 1.0}) or reg_weight (the diffusion "
                "weight), not both"
            )
        if regularization is None:
            sim = self.similarity_terms
            mse_only = sim is not None and len(sim) == 1 and isinstance(sim.losses[0], MSELoss)
            default = 0.01 if mse_only else 1.0
            self.reg_weight: float | None = float(default if reg_weight is None else reg_weight)
            self.resolve(reg_weight=self.reg_weight)
            regularization = {"diffusion": self.reg_weight}
        else:
            self.reg_weight = None
        self.regularization_terms = LossTerms(regularization, "regularizer", role="regularization")
        clash = sorted(set(self.regularization_terms.names) & set(_RESERVED_TERMS))
        if clash:
            raise ValueError(
                f"regularization: term name(s) {clash} are taken by the method's own terms "
                f"{_RESERVED_TERMS}; name them e.g. {{my_{clash[0]}: {{loss: ...}}}}"
            )
        self.bidirectional = bool(bidirectional)
        self.integration_steps = int(integration_steps)
        self.int_downsize = int(int_downsize)
        self.unet = UNet(ndim, 2, enc_features, dec_features, norm=norm, coord_conv=coord_conv)
        self.build_heads(self.unet.out_channels)

    # -- pieces a variant overrides
    allow_no_similarity: ClassVar[bool] = False
    """Whether ``similarity=None`` (no image term) is allowed."""
    similarity_losses: ClassVar[tuple[str, ...] | None] = SIMILARITIES
    """Registry similarity losses the method accepts (aliases included); None: any."""

    def build_similarity(self, similarity: LossSpec, window: int | None) -> LossTerms | None:
        """The image terms of ``similarity`` (the legacy ``window`` applies to a name)."""
        if window is not None and (
            isinstance(window, bool) or int(window) != window or window < 1 or window % 2 == 0
        ):
            raise ValueError(f"window must be an odd positive int, got {window}")
        if similarity is None:
            if not self.allow_no_similarity:
                raise ValueError(
                    f"{self.name or type(self).__name__} needs a similarity (e.g. 'lncc')"
                )
            return None
        if isinstance(similarity, str):
            terms = LossTerms(similarity, "similarity", role="similarity")
            if window is not None and "window" in terms.losses[0].option_names():
                terms = LossTerms({similarity: {"window": int(window)}}, "similarity")
            return self._check_similarities(terms)
        if window is not None:
            raise ValueError(
                f"window is the shorthand of a similarity given by name; with the spec "
                f"{similarity!r} give the window in it, e.g. {{lncc: {{window: {window}}}}}"
            )
        terms = LossTerms(similarity, "similarity", role="similarity")
        if not len(terms):
            raise ValueError("similarity: no term given (use None to train without one)")
        return self._check_similarities(terms)

    def _check_similarities(self, terms: LossTerms) -> LossTerms:
        if self.similarity_losses is not None:
            allowed = {loss_class(n)[0] for n in self.similarity_losses}
            for t, loss in zip(terms.specs, terms.losses, strict=True):
                if type(loss) not in allowed:
                    check_option("similarity", t.loss, self.similarity_losses)
        return terms

    def build_heads(self, channels: int) -> None:
        """Create the output head(s) on ``channels`` U-Net features."""
        self.flow = FlowHead(self.ndim, channels)

    def predict_field(self, features: Tensor) -> tuple[Tensor, dict]:
        """The field (displacement or velocity) on the coarse grid, and extras."""
        return self.flow(features), {}

    def image_loss(self, target: Tensor, warped: Tensor) -> dict[str, Tensor]:
        """Dissimilarity of ``warped`` to ``target``: each similarity term by name, and their
        weighted sum ``"total"`` (the method's image term)."""
        assert self.similarity_terms is not None
        return self.similarity_terms(target, warped)

    def similarity_loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        """The image term of :meth:`loss` (:meth:`image_loss` form): the fixed image against
        the warped moving one, averaged with the reverse direction when bidirectional."""
        sim = self.image_loss(batch.fixed, output.warped)
        if self.bidirectional:
            back = self.image_loss(batch.moving, output.extras["warped_fixed"])
            sim = {k: 0.5 * (sim[k] + back[k]) for k in sim}
        return sim

    def regularization(self, output: MethodOutput) -> dict[str, tuple[float, Tensor]]:
        """Named ``(weight, value)`` regularization terms of the network's field (velocity or
        coarse displacement, voxel units of its grid)."""
        reg = self.regularization_terms
        if not len(reg):
            return {}
        values = reg(output.extras["field"])
        return {name: (w, values[name]) for name, w in reg.weights.items()}

    def supervision(
        self, batch: RegistrationBatch, output: MethodOutput
    ) -> dict[str, tuple[float, Tensor]]:
        """Named ``(weight, value)`` terms that use labels (none for unsupervised methods)."""
        return {}

    def image_weight(self) -> float:
        return 1.0

    # -- shared implementation
    def field_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Size of the grid the network's field lives on, for images of ``shape``."""
        f = self.int_downsize
        return tuple(max(2, -(-int(s) // f)) if s > 1 else 1 for s in shape)

    @property
    def size_multiple(self) -> int:
        return self.unet.size_multiple

    def field_transform(self, field: Tensor, grid: Grid) -> SpatialTransform:
        """The transform of the network's ``field`` on the coarse copy of ``grid`` it lives
        on: a stationary velocity (``integration_steps > 0``) or a displacement."""
        coarse = grid.resized(field.shape[2:])
        if self.integration_steps:
            return StationaryVelocityField(coarse, field, self.integration_steps)
        return DisplacementField(coarse, field)

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        if fixed.dim() != self.ndim + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"{self.name or type(self).__name__}: fixed and moving must both be "
                f"(N, 1, *S) with {self.ndim} spatial dims; got {tuple(fixed.shape)} and "
                f"{tuple(moving.shape)}"
            )

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        self.check_pair(fixed, moving)
        grid = unit_grid(fixed) if grid is None else grid
        shape = tuple(fixed.shape[2:])
        features = self.unet(torch.cat([moving, fixed], 1))
        coarse = self.field_shape(shape)
        if coarse != shape:
            mode = "bilinear" if self.ndim == 2 else "trilinear"
            features = F.interpolate(features, size=coarse, mode=mode, align_corners=True)
        field, extras = self.predict_field(features)
        extras["field"] = field
        transform = self.field_transform(field, grid)
        out = MethodOutput(transform, grid, moving, extras)
        if self.bidirectional:
            backward = transform.inverse() if self.integration_steps else None
            back = (
                backward.voxel_displacement(grid)
                if backward is not None
                else -out.displacement  # VoxelMorph's bidir for a plain displacement
            )
            out.extras["backward_displacement"] = back
            out.extras["warped_fixed"] = warp(fixed, back)
        return out

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        terms: dict[str, tuple[float, Tensor]] = {}
        parts: dict[str, Tensor] = {}  # values of the terms inside a group (logged only)
        w = self.image_weight()
        if w and self.similarity_terms is not None:
            sim = self.similarity_loss(batch, output)
            terms["similarity"] = (w, sim["total"])
            if len(self.similarity_terms) > 1:
                parts.update({f"similarity_{k}": v for k, v in sim.items() if k != "total"})
        terms.update(self.supervision(batch, output))
        terms.update(self.regularization(output))
        out = {name: value for name, (_, value) in terms.items()}
        out.update(parts)
        out["total"] = sum(weight * value for weight, value in terms.values())
        return out


@register_method(
    "voxelmorph-diff",
    year=2018,
    ndim="2D/3D",
    transform="stationary velocity field (diffeomorphic)",
    loss="MSE/(2σ²) + KL (Laplacian prior)",
    supervision="unsupervised (probabilistic)",
    reference="Dalca et al., MICCAI 2018 / MedIA 2019",
    aliases=("vxm-diff",),
)
class VoxelMorphDiff(VoxelMorph):
    """Probabilistic diffeomorphic VoxelMorph: velocity mean and log-variance heads, sampling.

    The heads predict ``μ`` and ``log σ²`` of a stationary velocity on the grid
    ``int_downsize`` times coarser (2: the paper's half resolution); training samples
    ``v = μ + σ ε`` (``ε ~ N(0, I)``), evaluation (``model.eval()``, :meth:`predict`) uses
    ``μ``. ``v`` is integrated by ``integration_steps`` scaling-and-squaring steps and
    upsampled. Loss: ``1/(2 image_sigma²) · MSE`` (Gaussian likelihood of the fixed image) +
    :func:`kl_divergence` with ``prior_lambda``. The log-variance head starts at −10 with
    weights ~ N(0, 1e-10), as VoxelMorph. Extras: ``"mean"``, ``"log_variance"``.
    """

    def __init__(
        self,
        ndim: int = 3,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        image_sigma: float = 0.02,
        prior_lambda: float = 10.0,
        bidirectional: bool = False,
        integration_steps: int = 7,
        int_downsize: int = 2,
        norm: str | None = None,
        coord_conv: bool = False,
    ) -> None:
        if integration_steps < 1:
            raise ValueError(
                f"voxelmorph-diff integrates a velocity: integration_steps must be >= 1, "
                f"got {integration_steps}"
            )
        if image_sigma <= 0 or prior_lambda <= 0:
            raise ValueError(
                f"image_sigma and prior_lambda must be positive, got {image_sigma}, {prior_lambda}"
            )
        super().__init__(
            ndim,
            enc_features,
            dec_features,
            similarity="mse",
            regularization={},  # the KL divergence (below) is its regularizer
            bidirectional=bidirectional,
            integration_steps=integration_steps,
            int_downsize=int_downsize,
            norm=norm,
            coord_conv=coord_conv,
        )
        self.image_sigma = float(image_sigma)
        self.prior_lambda = float(prior_lambda)

    def build_heads(self, channels: int) -> None:
        self.flow = FlowHead(self.ndim, channels)  # mean
        self.log_variance = FlowHead(self.ndim, channels, std=1e-10, bias=-10.0)

    def predict_field(self, features: Tensor) -> tuple[Tensor, dict]:
        mean, log_var = self.flow(features), self.log_variance(features)
        v = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean) if self.training else mean
        return v, {"mean": mean, "log_variance": log_var}

    def image_weight(self) -> float:
        return 0.5 / self.image_sigma**2

    def regularization(self, output: MethodOutput) -> dict[str, tuple[float, Tensor]]:
        kl = kl_divergence(output.extras["mean"], output.extras["log_variance"], self.prior_lambda)
        return {"kl": (1.0, kl)}


@register_method(
    "voxelmorph-weakly",
    year=2018,
    ndim="2D/3D",
    transform="dense displacement (or SVF)",
    loss="Dice of warped labels (+ LNCC/MSE) + diffusion",
    supervision="weakly supervised (labels in training only)",
    reference="Hu et al., MedIA 2018; Balakrishnan et al., IEEE TMI 2019 (auxiliary Dice)",
    aliases=("vxm-weakly", "label-driven"),
)
class VoxelMorphWeakly(VoxelMorph):
    """VoxelMorph trained with labels: Dice of warped one-hot moving labels vs fixed labels.

    Loss = ``image_weight`` × similarity (skipped when 0 or ``similarity=None``) +
    ``dice_weight`` × ``label_loss`` + regularization (``reg_weight`` × diffusion by default).
    ``label_loss`` is a registered label loss by name — soft ``"dice"`` or Hu et al.'s
    ``"multiscale_dice"`` — or a spec of named weighted label terms (e.g.
    ``{"msdice": {"scales": [0, 1, 2, 4]}}``); the loss dict's ``"dice"`` is their weighted
    sum. The moving labels' one-hot channels (union of both maps' labels; background dropped
    unless ``include_background``) are warped by linear interpolation, so the Dice is
    differentiable in the displacement. Batches without labels raise a ValueError in
    :meth:`loss`; :meth:`forward` never needs labels. Other arguments as :class:`VoxelMorph`.
    """

    allow_no_similarity: ClassVar[bool] = True

    def __init__(
        self,
        ndim: int = 3,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        similarity: LossSpec = "lncc",
        window: int | None = None,
        image_weight: float = 1.0,
        dice_weight: float = 1.0,
        label_loss: LossSpec = "dice",
        include_background: bool = False,
        reg_weight: float | None = None,
        regularization: LossSpec = None,
        bidirectional: bool = False,
        integration_steps: int = 0,
        int_downsize: int = 1,
        norm: str | None = None,
        coord_conv: bool = False,
    ) -> None:
        label_terms = LossTerms(label_loss, "label", role="label_loss")
        if not len(label_terms):
            raise ValueError(f"label_loss: no term given; e.g. one of {LABEL_LOSSES}")
        if image_weight < 0 or dice_weight < 0:
            raise ValueError(f"weights must be >= 0, got {image_weight}, {dice_weight}")
        super().__init__(
            ndim,
            enc_features,
            dec_features,
            similarity=similarity,
            window=window,
            reg_weight=reg_weight,
            regularization=regularization,
            bidirectional=bidirectional,
            integration_steps=integration_steps,
            int_downsize=int_downsize,
            norm=norm,
            coord_conv=coord_conv,
        )
        self._image_weight = float(image_weight)
        self.dice_weight = float(dice_weight)
        self.label_loss = label_loss
        self.label_terms = label_terms
        self.include_background = bool(include_background)

    def image_weight(self) -> float:
        return self._image_weight

    def supervision(
        self, batch: RegistrationBatch, output: MethodOutput
    ) -> dict[str, tuple[float, Tensor]]:
        if batch.fixed_labels is None or batch.moving_labels is None:
            raise ValueError(
                f"{self.name}: the loss needs fixed_labels and moving_labels in the batch"
            )
        fixed_oh, moving_oh = one_hot_union(
            batch.fixed_labels, batch.moving_labels, self.include_background
        )
        if fixed_oh.shape[1] == 0:
            return {"dice": (self.dice_weight, output.warped.new_zeros(()))}
        warped_oh = warp(moving_oh, output.displacement)
        return {"dice": (self.dice_weight, self.label_terms(fixed_oh, warped_oh)["total"])}
