"""Classical iterative registration (Eq. 1 of the review, optimized per pair).

Rigid → affine → stationary-velocity (diffeomorphic) stages, each coarse to fine on a
Gaussian pyramid, all driven by one generic loop over the same transforms and losses the
networks use: each stage's similarity (``metric``) and regularizers are named registry terms
(:func:`~learnreg.optimize.config.similarity_terms`). The result maps fixed world points to moving ones: ``x ↦ A(x + u(x))``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.io.validate import check_axes
from learnreg.optimize.adam import Adam
from learnreg.optimize.config import (
    DEFAULT_KERNEL,
    ClassicalConfig,
    DeformableStage,
    LinearStage,
    preset,
    regularization_terms,
    similarity_terms,
)
from learnreg.optimize.initialize import (
    center_of_mass,
    com_init,
    implausible_affine,
    overlap_warning,
    search_init,
)
from learnreg.optimize.masks import MetricMasks
from learnreg.optimize.pyramid import Pyramid, level_factor, normalize_intensity
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.factory import create_transform
from learnreg.spatial.fields import resize_displacement
from learnreg.spatial.filters import gaussian_blur
from learnreg.spatial.lddmm import GeodesicShooting
from learnreg.spatial.result import RegistrationResult
from learnreg.spatial.sampling import regular_coords
from learnreg.spatial.svf import StationaryVelocityField, integrate_velocity

__all__ = ["register", "check_pair", "Progress"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, float], None]
"""Callback ``(stage, iteration, total, loss)`` called after every iteration."""


def register(
    fixed: Image,
    moving: Image,
    config: ClassicalConfig | str = "default",
    initial: AffineTransform | None = None,
    progress: Progress | None = None,
    initial_field: DisplacementField | None = None,
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` by iterative optimization.

    Args:
        fixed, moving: images of the same dimensionality (any grids) and channel count;
            several channels (e.g. one-hot label maps) are compared channel by channel by the
            metric (mean over them for MSE).
        config: a :class:`ClassicalConfig` or the name of a preset.
        initial: starting affine (world, fixed→moving); default aligns centres of mass.
        progress: optional callback for progress display.
        initial_field: a starting velocity (``svf`` stage) or displacement (``displacement``
            stage) in the fixed image's world space, e.g. a network's prediction, on any
            grid; the deformable stage optimizes a smooth residual added to it
            (refinement). It is applied before the affine, as the result's field is.
        fixed_mask, moving_mask: restrict the similarity to voxels inside both (value > 0),
            as ANTs' ``-x``; each on its image's world space (any grid).
    """
    cfg = preset(config) if isinstance(config, str) else config.validate()
    check_pair(fixed, moving)
    t0 = time.perf_counter()
    masks = MetricMasks(fixed, moving, fixed_mask, moving_mask)
    with torch.enable_grad():
        f = Pyramid(normalize_intensity(fixed))
        m = Pyramid(normalize_intensity(moving))
        start: dict = {"init": "given" if initial is not None else cfg.init}
        if initial is not None:
            matrix = initial.homogeneous()[0].detach()
        elif cfg.init == "search":
            stage = cfg.linear[0] if cfg.linear else LinearStage("rigid")
            shrink = max(stage.shrink)
            sim = similarity_terms(stage, cfg)
            matrix, start = search_init(f.level(shrink), m.level(shrink), sim, masks=masks)
        else:
            matrix = com_init(f.image, m.image)
        for stage in cfg.linear:
            matrix = _linear_stage(f, m, matrix, stage, cfg, progress, masks)
        affine = AffineTransform(matrix)
        warnings = implausible_affine(matrix, hint=start["init"] == "com") if cfg.linear else []
        overlap = overlap_warning(fixed, moving, matrix)
        if overlap is not None:
            warnings.append(overlap)
        fwd = inv = velocity = None
        if cfg.deformable is not None:
            fwd, inv, velocity = _svf_stage(
                f, m, affine, cfg.deformable, cfg, progress, initial_field, masks
            )
    info = {
        "method": "classical",
        "config": cfg.to_dict(),
        "initialization": start,
        "seconds": time.perf_counter() - t0,
    }
    if warnings:
        info["warnings"] = warnings
        for w in warnings:
            log.warning("%s → %s: %s", moving.name, fixed.name, w)
    if fwd is None:
        return RegistrationResult(fixed.grid, moving.grid, affine, info=info)
    return RegistrationResult.from_native(fixed.grid, moving.grid, affine, fwd, inv, info, velocity)


def check_pair(fixed: Image, moving: Image) -> None:
    """Raise :class:`InputError` unless the pair can be registered (same n-D, valid data)."""
    if fixed.ndim != moving.ndim:
        raise InputError(
            f"{moving.name} is {moving.ndim}D but {fixed.name} is {fixed.ndim}D: "
            "fixed and moving must have the same dimensionality"
        )
    if fixed.channels != moving.channels:
        raise InputError(
            f"{moving.name} has {moving.channels} channels but {fixed.name} has "
            f"{fixed.channels}: a multichannel pair (e.g. one-hot label maps) needs the same "
            "channels in both, compared channel by channel"
        )
    for im in (fixed, moving):
        check_axes(im.name, im.grid.shape, minimum=4)
        im.validate_intensities()


# ---------------------------------------------------------------------------- linear
def _normalizing_frame(grid: Grid, center: torch.Tensor) -> torch.Tensor:
    """Matrix taking world mm to a frame centred on ``center`` with unit ≈ half the extent.

    Optimizing linear parameters in this frame gives rotations and translations comparable
    step sizes, so one learning rate serves both.
    """
    d = grid.ndim
    scale = 0.5 * float(np.mean(np.asarray(grid.extent))) or 1.0
    n = torch.eye(d + 1, dtype=torch.float64)
    n[:d, :d] /= scale
    n[:d, d] = -center.double() / scale
    return n


def _linear_stage(
    fixed: Pyramid,
    moving: Pyramid,
    matrix: torch.Tensor,
    stage: LinearStage,
    config: ClassicalConfig,
    progress: Progress | None,
    masks: MetricMasks,
) -> torch.Tensor:
    frame = _normalizing_frame(fixed.image.grid, center_of_mass(fixed.image))
    frame_inv = torch.linalg.inv(frame)
    delta = create_transform(stage.model, ndim=fixed.image.ndim, learnable=True)
    opt = Adam(delta.parameters(), lr=stage.learning_rate)
    sim = similarity_terms(stage, config)

    def total() -> torch.Tensor:
        d = delta.homogeneous()[0].double()
        return (matrix.double() @ frame_inv @ d @ frame).float()

    for shrink, iters in zip(stage.shrink, stage.iterations, strict=True):
        fl, ml = fixed.level(shrink), moving.level(shrink)
        target = fl.batch()
        for it in range(iters):
            opt.zero_grad()
            coords = regular_coords(fl.grid, ml.grid, AffineTransform(total()[None]), "cpu")
            warped, weight = masks.sample(fl, ml, coords)
            loss = sim(target, warped, **masks.overrides(weight))["total"]
            loss.backward()
            opt.step()
            if progress:
                progress(f"{stage.model} 1/{shrink:g}", it + 1, iters, loss.item())
    return total().detach()


# ---------------------------------------------------------------------------- deformable
def _svf_stage(
    fixed: Pyramid,
    moving: Pyramid,
    affine: AffineTransform,
    stage: DeformableStage,
    config: ClassicalConfig,
    progress: Progress | None,
    initial: DisplacementField | None = None,
    masks: MetricMasks | None = None,
) -> tuple[DisplacementField, DisplacementField, StationaryVelocityField | GeodesicShooting | None]:
    """The velocity optimized coarse to fine: ``(exp(v), exp(−v), v)`` on the velocity's grid
    (for ``model="displacement"``: the displacement there, its iterative inverse on the fixed
    grid, and no velocity; for ``model="lddmm"``: ``φ⁻¹``, ``φ`` and the geodesic, holding
    its initial momentum)."""
    masks = masks or MetricMasks(fixed.image, moving.image)
    sim = similarity_terms(stage, config)
    reg = regularization_terms(stage)
    diffeomorphic = stage.model == "svf"
    lddmm = stage.model == "lddmm"
    if lddmm and initial is not None:
        raise ValueError("deformable model lddmm starts from zero momentum (no initial field)")

    def shot(m: torch.Tensor, grid: Grid) -> GeodesicShooting:
        """The geodesic of momentum ``m`` on ``grid`` (the kernel's α in mm²)."""
        kernel = {**DEFAULT_KERNEL, **stage.kernel}
        return GeodesicShooting(grid, m, **kernel, steps=stage.steps, physical=True)

    def exp(v: torch.Tensor) -> torch.Tensor:
        return integrate_velocity(v, stage.steps) if diffeomorphic else v

    def field_and_penalty(
        p: torch.Tensor, grid: Grid, base: torch.Tensor | float
    ) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """The displacement (fixed → moving) of parameters ``p`` on ``grid`` (plus ``base``, the
        initial field there) and its regularization (evaluated when called)."""
        if lddmm:
            s = shot(p, grid)
            return s.backward_displacement(), lambda: stage.energy_weight * s.energy().sum()
        v = base + gaussian_blur(p, stage.velocity_sigma)
        return exp(v), lambda: reg(v)["total"]

    def base_on(grid: Grid) -> torch.Tensor | float:
        """The initial field in voxels of ``grid`` (what the residual is added to)."""
        return 0.0 if initial is None else initial.resampled(grid).voxel_field().detach()

    velocity: torch.Tensor | None = None
    levels = zip(stage.shrink, stage.velocity_shrink, stage.iterations, strict=True)
    for shrink, vshrink, iters in levels:
        fl, ml = fixed.level(shrink), moving.level(shrink)
        full = fixed.image.grid
        vgrid = full.downsampled(level_factor(full.shape, max(shrink, vshrink)))
        if velocity is None:
            velocity = torch.zeros(1, full.ndim, *vgrid.shape)
        elif tuple(velocity.shape[2:]) != vgrid.shape:
            velocity = resize_displacement(velocity, vgrid.shape)
        base = base_on(vgrid)
        param = torch.nn.Parameter(velocity)
        opt = Adam([param], lr=stage.learning_rate)
        pts = affine(fl.grid.world_points().unsqueeze(0))
        # level-grid voxel displacement → moving world offset: affine ∘ (direction · spacing)
        to_world = affine.homogeneous()[0, :-1, :-1] @ torch.as_tensor(
            fl.grid.affine[:-1, :-1], dtype=torch.float32
        )
        target = fl.batch()
        for it in range(iters):
            opt.zero_grad()
            u, penalty = field_and_penalty(param, vgrid, base)
            u = resize_displacement(u, fl.grid.shape)
            mapped = pts + u.movedim(1, -1) @ to_world.T
            warped, weight = masks.sample(fl, ml, ml.grid.world_to_grid_sample(mapped))
            loss = sim(target, warped, **masks.overrides(weight))["total"] + penalty()
            loss.backward()
            opt.step()
            if progress:
                progress(f"{'LDDMM' if lddmm else 'SVF'} 1/{shrink:g}", it + 1, iters, loss.item())
        velocity = param.detach()
    assert velocity is not None
    with torch.no_grad():
        if lddmm:  # φ⁻¹ and φ from the same geodesic, the momentum kept
            geodesic = shot(velocity, vgrid)
            backward, forward = geodesic.maps()
            return DisplacementField(vgrid, backward), DisplacementField(vgrid, forward), geodesic
        v = base + gaussian_blur(velocity, stage.velocity_sigma)
        fwd = DisplacementField(vgrid, exp(v))
        if diffeomorphic:  # exact inverse of exp(v) is exp(-v)
            inv = DisplacementField(vgrid, exp(-v))
        else:  # iterative inverse, on the fixed grid
            inv = DisplacementField(fixed.image.grid, fwd.voxel_displacement(fixed.image.grid))
            inv = inv.inverse()
    svf = StationaryVelocityField(vgrid, v, stage.steps) if diffeomorphic else None
    return fwd, inv, svf
