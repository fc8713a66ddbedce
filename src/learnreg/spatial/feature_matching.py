"""HAMMER-like hierarchical correspondence of voxel attribute vectors, 2D/3D.

Given an attribute (feature) vector at every voxel of the fixed and the moving image and an
importance map of the fixed image, :func:`hierarchical_matching` estimates a dense
displacement ``u`` (voxels, ``x ↦ x + u(x)`` maps fixed to moving indices) as HAMMER does
(Shen and Davatzikos 2002; with learned attributes, Wu et al. 2016):

* per level, the *driving voxels* are the top ``fraction`` of the fixed image's voxels by
  importance (few at first, more later);
* every driving voxel looks, within ``radius`` voxels (a lattice of ``step``), for the
  moving voxel whose attribute vector is most similar to its own — cosine similarity of the
  standardized attribute vectors, averaged over a Gaussian window of ``window`` voxels
  (HAMMER compares neighbourhoods, not single voxels); the best similarity is its confidence;
* the sparse matches are interpolated into a dense update by Gaussian-weighted averaging
  (normalized convolution of width ``sigma``), exponentiated (scaling and squaring, so each
  update is a diffeomorphism), composed with the current map, and the map is smoothed with
  ``smooth`` voxels (the elastic regularization of Demons-type schemes);
* the moving attributes are recomputed on the moving image warped by the current map before
  each iteration.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from learnreg.spatial.fields import compose_displacements
from learnreg.spatial.filters import gaussian_blur
from learnreg.spatial.sampling import warp
from learnreg.spatial.svf import integrate_velocity

__all__ = [
    "MatchingLevel",
    "DEFAULT_LEVELS",
    "channel_statistics",
    "standardize",
    "driving_voxels",
    "best_shifts",
    "interpolate_matches",
    "hierarchical_matching",
]


@dataclass(frozen=True)
class MatchingLevel:
    """One level of the hierarchy: share of driving voxels, search radius and lattice step
    (voxels), interpolation width ``sigma`` (voxels) and iterations."""

    fraction: float
    radius: int
    step: int
    sigma: float
    iterations: int

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1 or self.radius < 0 or self.step < 1 or self.sigma <= 0:
            raise ValueError(
                f"MatchingLevel: need 0 < fraction <= 1, radius >= 0, step >= 1, sigma > 0; got "
                f"{self}"
            )
        if self.iterations < 1:
            raise ValueError(f"MatchingLevel: iterations must be >= 1, got {self.iterations}")


DEFAULT_LEVELS: tuple[MatchingLevel, ...] = (
    MatchingLevel(0.05, 6, 2, 4.0, 4),
    MatchingLevel(0.15, 3, 1, 3.0, 4),
    MatchingLevel(0.3, 2, 1, 2.0, 4),
    MatchingLevel(0.6, 1, 1, 1.5, 4),
)
"""Few driving voxels and a large search first, more voxels and a smaller search later."""


def channel_statistics(features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per image and channel mean and standard deviation ``(N, C, 1, ...)`` of ``features``
    ``(N, C, *S)`` over the image (over ``mask`` ``(N, 1, *S)`` where given)."""
    dims = tuple(range(2, features.dim()))
    w = torch.ones_like(features[:, :1]) if mask is None else mask.to(features.dtype)
    n = w.sum(dims, keepdim=True).clamp_min(1.0)
    mean = (features * w).sum(dims, keepdim=True) / n
    var = ((features - mean).square() * w).sum(dims, keepdim=True) / n
    return mean, var.sqrt().clamp_min(1e-6)


def standardize(features: Tensor, statistics: tuple[Tensor, Tensor]) -> Tensor:
    """Each channel of ``features`` ``(N, C, *S)`` z-scored by ``statistics`` (mean, std;
    :func:`channel_statistics`), then every voxel's vector scaled to unit length."""
    mean, std = statistics
    return F.normalize((features - mean) / std, dim=1, eps=1e-6)


def driving_voxels(importance: Tensor, fraction: float, foreground: Tensor | None = None) -> Tensor:
    """Boolean ``(N, 1, *S)``: the top ``fraction`` of (``foreground``) voxels of
    ``importance`` ``(N, 1, *S)`` per image (at least one)."""
    imp = importance.flatten(1).clone()
    if foreground is not None:
        imp[~foreground.flatten(1).bool()] = -torch.inf
    count = torch.isfinite(imp).sum(1)
    k = (count.double() * fraction - 1e-9).ceil().long().clamp_min(1)
    ordered = imp.sort(1, descending=True).values
    threshold = ordered.gather(1, (k - 1)[:, None])
    out = (imp >= threshold) & torch.isfinite(imp)
    return out.reshape(importance.shape)


def _shift(x: Tensor, offset: Sequence[int]) -> Tensor:
    """``y(p) = x(p + offset)`` (zero outside)."""
    d = len(offset)
    r = max(abs(o) for o in offset) if offset else 0
    if r == 0:
        return x
    padded = F.pad(x, [r, r] * d)
    index = [slice(None), slice(None)]
    index += [slice(r + o, r + o + s) for o, s in zip(offset, x.shape[2:], strict=True)]
    return padded[tuple(index)]


def best_shifts(
    fixed: Tensor, moving: Tensor, radius: int, step: int = 1, window: float = 1.0
) -> tuple[Tensor, Tensor]:
    """For every voxel, the lattice offset ``s`` (``|s_i| ≤ radius``, multiples of ``step``)
    maximizing the window-averaged similarity ``⟨f(x), m(x + s)⟩`` of unit attribute vectors
    ``fixed``, ``moving`` ``(N, C, *S)``; ties go to the shorter offset. Returns the offsets
    ``(N, D, *S)`` (voxels) and the best similarity ``(N, 1, *S)``."""
    d = fixed.dim() - 2
    line = range(-(radius // step) * step, radius + 1, step)
    offsets = list(itertools.product(line, repeat=d))
    scores = torch.stack([(fixed * _shift(moving, o)).sum(1) for o in offsets], 1)
    if window > 0:
        scores = gaussian_blur(scores, window)
    length = torch.tensor([sum(v * v for v in o) for o in offsets], dtype=scores.dtype)
    scores = scores - 1e-4 * length.reshape(1, -1, *[1] * d) / max(radius, 1) ** 2
    best, which = scores.max(1, keepdim=True)
    table = torch.tensor(offsets, dtype=fixed.dtype, device=fixed.device)  # (K, D)
    shift = table[which[:, 0]].movedim(-1, 1)
    return shift, best


def interpolate_matches(shift: Tensor, weight: Tensor, sigma: float) -> Tensor:
    """Dense field from sparse matches: the Gaussian-weighted average (width ``sigma``
    voxels) of ``shift`` ``(N, D, *S)`` with ``weight`` ``(N, 1, *S)`` (0 off the matches);
    where no match is near, the field fades to zero."""
    num = gaussian_blur(shift * weight, sigma)
    den = gaussian_blur(weight, sigma)
    # the average of the matches, damped where their total weight is below a full window's
    # average weight of a sparse set (far from every match)
    scale = den.flatten(1).amax(1).reshape(-1, *[1] * (shift.dim() - 1)).clamp_min(1e-12)
    return num / (den + 0.05 * scale)


def hierarchical_matching(
    fixed_features: Tensor,
    moving: Tensor,
    features: Callable[[Tensor], Tensor],
    importance: Tensor,
    levels: Sequence[MatchingLevel] = DEFAULT_LEVELS,
    window: float = 1.0,
    smooth: float = 1.0,
    foreground: Tensor | None = None,
    initial: Tensor | None = None,
) -> Tensor:
    """The displacement ``(N, D, *S)`` (voxels) matching ``moving`` ``(N, 1, *S)`` to the
    fixed image whose attribute vectors are ``fixed_features`` ``(N, C, *S)`` (module
    docstring). ``features(image)`` computes the attribute vectors of a (warped) moving
    image; ``importance`` ``(N, 1, *S)`` ranks the fixed voxels, ``foreground`` (boolean
    ``(N, 1, *S)``) restricts the driving voxels; ``initial`` starts the map."""
    d = moving.dim() - 2
    if fixed_features.dim() != d + 2 or fixed_features.shape[2:] != moving.shape[2:]:
        raise ValueError(
            f"hierarchical_matching: fixed features {tuple(fixed_features.shape)} and moving "
            f"image {tuple(moving.shape)} must share the batch and spatial shape"
        )
    if importance.shape != moving.shape:
        raise ValueError(
            f"hierarchical_matching: importance {tuple(importance.shape)} must be shaped like "
            f"the moving image {tuple(moving.shape)}"
        )
    n = moving.shape[0]
    u = moving.new_zeros(n, d, *moving.shape[2:]) if initial is None else initial.clone()
    stats = channel_statistics(fixed_features, foreground)  # one scale for both images
    f = standardize(fixed_features, stats)
    for level in levels:
        driving = driving_voxels(importance, level.fraction, foreground).to(moving.dtype)
        for _ in range(level.iterations):
            m = standardize(features(warp(moving, u)), stats)
            shift, score = best_shifts(f, m, level.radius, level.step, window)
            update = interpolate_matches(shift, driving * score.clamp_min(0), level.sigma)
            u = compose_displacements(u, integrate_velocity(update, 4))
            if smooth > 0:
                u = gaussian_blur(u, smooth)
    return u
