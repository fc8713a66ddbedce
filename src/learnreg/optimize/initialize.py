"""Where a classical registration starts, and whether where it ended is plausible.

``com`` aligns the centres of mass. ``search`` (as ANTs' ``antsAI``) also tries rotations
about them on a coarse grid of angles — every ``step`` degrees about each axis — scores each
by the first linear stage's similarity on the coarsest images and starts from the best, so a
header that is wrong by a large rotation (e.g. 180° about S) is recovered.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from learnreg.core.grid import apply_matrix
from learnreg.core.image import Image
from learnreg.losses.terms import LossTerms
from learnreg.optimize.masks import MetricMasks

__all__ = [
    "center_of_mass",
    "com_init",
    "rotation_candidates",
    "search_init",
    "rotation_angle",
    "implausible_affine",
    "overlap_warning",
]

SEARCH_STEP = {2: 15.0, 3: 30.0}
"""Default angle step of the rotation search, degrees (2D: 24 angles; 3D: 12³ Euler angles,
duplicates removed)."""


def center_of_mass(image: Image) -> torch.Tensor:
    """Intensity-weighted centre (world mm, float64) of the non-negative part of ``image``
    (of all its channels)."""
    w = image.data.float().clamp(min=0).sum(0)
    # index-space centre from the marginals (no per-voxel coordinate array), then to world
    marginals = [w.sum(dim=[a for a in range(w.dim()) if a != k]).double() for k in range(w.dim())]
    total = marginals[0].sum().clamp(min=1e-12)
    index = [(m * torch.arange(len(m), dtype=m.dtype)).sum() / total for m in marginals]
    affine = torch.as_tensor(image.grid.affine, dtype=torch.float64)
    return affine[:-1, :-1] @ torch.stack(index) + affine[:-1, -1]


def _about_centres(rotation: torch.Tensor, fixed_c: torch.Tensor, moving_c: torch.Tensor):
    """``x ↦ R (x − c_f) + c_m`` as a homogeneous matrix (float64)."""
    d = rotation.shape[-1]
    m = torch.eye(d + 1, dtype=torch.float64)
    m[:d, :d] = rotation
    m[:d, d] = moving_c - rotation @ fixed_c
    return m


def com_init(fixed: Image, moving: Image) -> torch.Tensor:
    """Translation that aligns the centres of mass (fixed → moving), float32."""
    eye = torch.eye(fixed.ndim, dtype=torch.float64)
    return _about_centres(eye, center_of_mass(fixed), center_of_mass(moving)).float()


def _axis_rotation(axis: int, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    r = torch.eye(3, dtype=torch.float64)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def rotation_candidates(ndim: int, step: float | None = None) -> torch.Tensor:
    """Rotations ``(K, D, D)`` every ``step`` degrees (2D: about the normal; 3D: Euler angles
    about x, y, z, duplicates removed), the identity first."""
    step = SEARCH_STEP[ndim] if step is None else float(step)
    if not 0 < step <= 180:
        raise ValueError(f"rotation search step must be in (0, 180] degrees, got {step}")
    angles = [math.radians(a) for a in np.arange(0.0, 360.0 - 1e-9, step)]
    if ndim == 2:
        return torch.stack(
            [
                torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
                for a in angles
            ]
        ).double()
    seen, out = set(), []
    for a, b, c in itertools.product(angles, repeat=3):
        r = _axis_rotation(2, c) @ _axis_rotation(1, b) @ _axis_rotation(0, a)
        key = tuple(np.round(r.numpy(), 6).ravel())
        if key not in seen:
            seen.add(key)
            out.append(r)
    return torch.stack(out)


@torch.no_grad()
def search_init(
    fixed: Image,
    moving: Image,
    similarity: LossTerms,
    step: float | None = None,
    chunk: int = 64,
    masks: MetricMasks | None = None,
) -> tuple[torch.Tensor, dict]:
    """The best of :func:`rotation_candidates` about the centres of mass, by ``similarity``
    (lower is better) of ``moving`` resampled onto ``fixed``'s grid (give coarse images).

    Returns the matrix (float32, fixed → moving world) and what was searched."""
    fc, mc = center_of_mass(fixed), center_of_mass(moving)
    rotations = rotation_candidates(fixed.ndim, step)
    pts = fixed.grid.world_points(torch.float64)
    target = fixed.batch().float()
    masks = masks or MetricMasks(fixed, moving)
    scores = []
    for start in range(0, len(rotations), chunk):
        mats = torch.stack([_about_centres(r, fc, mc) for r in rotations[start : start + chunk]])
        mapped = apply_matrix(mats, pts.reshape(1, -1, fixed.ndim).expand(len(mats), -1, -1))
        mapped = mapped.reshape(len(mats), *fixed.grid.shape, fixed.ndim)
        warped, weight = masks.sample(
            fixed, moving, moving.grid.world_to_grid_sample(mapped.float())
        )
        for k in range(len(mats)):
            w = None if weight is None else weight[k : k + 1]
            scores.append(
                float(similarity(target, warped[k : k + 1], **masks.overrides(w))["total"])
            )
    best = int(np.argmin(scores))
    info = {
        "init": "search",
        "candidates": len(rotations),
        "best_rotation_degrees": math.degrees(rotation_angle(rotations[best])),
        "identity_score": scores[0],
        "best_score": scores[best],
    }
    return _about_centres(rotations[best], fc, mc).float(), info


def rotation_angle(linear: torch.Tensor) -> float:
    """Angle (radians) of the rotation nearest to the linear part ``(D, D)`` (polar
    decomposition)."""
    u, _, vh = torch.linalg.svd(linear.double())
    r = u @ vh
    if r.shape[0] == 2:
        return abs(math.atan2(float(r[1, 0]), float(r[0, 0])))
    cos = (float(torch.trace(r)) - 1.0) / 2.0
    return math.acos(max(-1.0, min(1.0, cos)))


def implausible_affine(
    matrix: torch.Tensor, max_degrees: float = 45.0, hint: bool = True
) -> list[str]:
    """Reasons to doubt a recovered fixed → moving affine: a volume change far from 1
    (det outside [0.5, 2], or a reflection) or a rotation over ``max_degrees`` — usually a
    wrong header (orientation) rather than anatomy; empty when plausible. ``hint`` suggests
    the rotation search (when it was not used)."""
    d = matrix.shape[-1] - 1
    lin = matrix[..., :d, :d].reshape(d, d).double()
    det = float(torch.linalg.det(lin))
    out = []
    if not 0.5 <= det <= 2.0:
        what = "a reflection" if det < 0 else f"a volume change of {det:.2f}×"
        out.append(f"the affine implies {what}; check the images' headers and field of view")
    angle = math.degrees(rotation_angle(lin))
    if det > 0 and angle > max_degrees:
        out.append(
            f"the affine rotates by {angle:.0f}° (more than {max_degrees:.0f}°): the headers "
            "probably disagree about orientation; check them"
            + (", or start with --init search" if hint else "")
        )
    return out


def overlap_warning(fixed: Image, moving: Image, matrix: torch.Tensor) -> str | None:
    """A warning when, under the fixed → moving ``matrix``, less than half of the fixed
    image's foreground (voxels above its mean, ~4096 sampled) lands inside the moving image's
    field of view — the registered image would then be mostly empty; None otherwise."""
    grid = fixed.grid
    stride = max(1, round((grid.numel / 4096) ** (1 / grid.ndim)))
    every = (slice(None, None, stride),) * grid.ndim
    data = fixed.data.sum(0)[every].double()
    axes = [torch.arange(0, n, stride, dtype=torch.float64) for n in grid.shape]
    pts = grid.index_to_world(torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1))
    fg = data > data.mean()
    if not bool(fg.any()):
        return None
    idx = moving.grid.world_to_index(apply_matrix(matrix.detach().double(), pts[fg]))
    shape = torch.tensor(moving.grid.shape, dtype=idx.dtype)
    inside = ((idx >= -0.5) & (idx <= shape - 0.5)).all(-1)
    share = float(inside.double().mean())
    if share >= 0.5:
        return None
    return (
        f"after the linear stage only {share:.0%} of the fixed image's foreground lies inside "
        "the moving image's field of view: the images barely overlap (different fields of "
        "view, or wrong headers?)"
    )
