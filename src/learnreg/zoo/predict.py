"""Registration by a trained network, in physical space, with optional refinement.

Any learned method, whatever transform it predicts:

1. **pre-alignment**: the classical preset the model was trained after (``affine`` for the
   shipped brain model), if any, registers the pair;
2. **prediction**: both images are put on the model's network grid by its recorded
   preprocessing (the training spacing, or the fixed-size network's shape, over the fixed
   image's field of view; the moving image through the pre-alignment), and the network
   predicts a world-space transform there (:class:`~learnreg.methods.base.MethodOutput`);
3. **refinement** (``refine=N``): N iterations of classical optimization starting from the
   prediction — of the deformable stage (a smooth residual velocity added to a predicted
   velocity, so the result stays diffeomorphic; a residual displacement otherwise) or, for a
   purely linear prediction, of the affine stage;
4. the transform becomes a :class:`~learnreg.spatial.RegistrationResult` ``x ↦ A(x + u(x))``
   on the fixed image's grid — a learned linear transform as the affine ``A`` (an ITK
   ``.mat``), anything else as a displacement and its inverse — that warps, inverts and saves
   itself like a classical one.
"""

from __future__ import annotations

import time

import torch

from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.optimize.classical import Progress, check_pair, register
from learnreg.optimize.config import ClassicalConfig, DeformableStage, LinearStage, preset
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.base import SpatialTransform
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.linear import compose_affine
from learnreg.spatial.result import RegistrationResult, split_linear
from learnreg.spatial.svf import StationaryVelocityField
from learnreg.zoo.models import PretrainedModel

__all__ = ["predict", "refinement_config"]


def _shrink(model: PretrainedModel, fixed: Image, grid: Grid) -> float:
    """Image shrink factor of the model's resolution relative to the fixed image's."""
    return max(1.0, min(grid.spacing) / min(fixed.grid.spacing))


REFINE_LEARNING_RATE = 0.02
"""Adam step of the refinement (velocity voxels); chosen on LPBA40 training subjects S12, S14
(S01 ← S12/S14, 30 steps: Dice +0.016 and +0.016; 0.05 gained less, 0.25 lost 0.01)."""


def refinement_config(
    model: PretrainedModel, fixed: Image, grid: Grid, iterations: int, kind: str
) -> ClassicalConfig:
    """The classical stage that refines a prediction on the network grid ``grid``: ``kind``
    ``"svf"`` or ``"displacement"`` — LNCC (window 5) at the model's resolution, the residual
    velocity at that resolution too (a grid twice coarser gained half as much), integrated
    with the model's own number of steps, small Adam steps (:data:`REFINE_LEARNING_RATE`)
    — or ``"affine"`` — NCC at the model's resolution; ``iterations`` steps."""
    shrink = _shrink(model, fixed, grid)
    if kind == "affine":
        stage = LinearStage("affine", shrink=(shrink,), iterations=(int(iterations),))
        return ClassicalConfig(linear=[stage], deformable=None).validate()
    steps = int(getattr(model.method, "integration_steps", 0) or 7)
    return ClassicalConfig(
        linear=[],
        deformable=DeformableStage(
            model=kind,
            shrink=(shrink,),
            velocity_shrink=(shrink,),
            iterations=(int(iterations),),
            learning_rate=REFINE_LEARNING_RATE,
            steps=steps,
        ),
    ).validate()


def _refine(
    fixed: Image,
    moving: Image,
    model: PretrainedModel,
    grid: Grid,
    transform: SpatialTransform,
    prealign: AffineTransform,
    iterations: int,
    progress: Progress | None,
    masks: dict | None = None,
) -> tuple[RegistrationResult, dict]:
    masks = masks or {}
    head, linear = split_linear(transform)
    start = compose_affine(prealign, linear)
    if head is None:
        cfg = refinement_config(model, fixed, grid, iterations, "affine")
        return register(
            fixed, moving, cfg, initial=start, progress=progress, **masks
        ), cfg.to_dict()
    if isinstance(head, StationaryVelocityField):
        kind, field = "svf", DisplacementField(head.grid, head.velocity[:1])
    elif isinstance(head, DisplacementField):
        kind, field = "displacement", head
    else:
        with torch.no_grad():
            kind, field = "displacement", DisplacementField(grid, head.voxel_displacement(grid))
    cfg = refinement_config(model, fixed, grid, iterations, kind)
    result = register(
        fixed, moving, cfg, initial=start, progress=progress, initial_field=field, **masks
    )
    return result, cfg.to_dict()


def predict(
    fixed: Image,
    moving: Image,
    model: PretrainedModel,
    refine: int = 0,
    progress: Progress | None = None,
    initial: AffineTransform | None = None,
    init: str | None = None,
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
    device: torch.device | str = "cpu",
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with ``model`` (+ ``refine`` optimization steps).

    ``initial`` (world, fixed→moving) starts the model's pre-alignment, or replaces it when
    the model has none; ``init`` (``com``/``search``) overrides the pre-alignment's start.
    ``fixed_mask``/``moving_mask`` restrict the similarity of the pre-alignment and the
    refinement (the network sees whole images). ``device``: where the network runs (the
    pre-alignment, refinement and resampling run on the CPU)."""
    masks = {"fixed_mask": fixed_mask, "moving_mask": moving_mask}
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    check_pair(fixed, moving)
    model.check_pair(fixed, moving)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if model.prealign is not None:
        cfg = preset(model.prealign)
        cfg.init = init or cfg.init
        affine = register(
            fixed, moving, cfg.validate(), initial, progress=progress, **masks
        ).linear()
    else:
        affine = initial if initial is not None else AffineTransform.identity(fixed.ndim)
    timings["prealign"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    grid = model.grid_for(fixed)
    pre = model.preprocessor
    dev = torch.device(device)
    f = pre.image(fixed, grid).batch().to(dev)
    m = pre.image(moving, grid, affine).batch().to(dev)
    net = model.method.to(dev)
    try:
        transform = net.predict(f, m, grid).transform.to("cpu")
    finally:
        net.to("cpu")
    timings["network"] = time.perf_counter() - t1

    info = {
        "method": "model",
        "model": model.name,
        "network": model.method.name,
        "transform": type(transform).__name__,
        "device": str(dev),
        "prealign": model.prealign,
        "network_grid": grid.to_dict(),
        "refine": int(refine),
    }
    t2 = time.perf_counter()
    if refine:
        result, info["refinement"] = _refine(
            fixed, moving, model, grid, transform, affine, refine, progress, masks
        )
        result.info = info
    else:
        result = RegistrationResult.from_transform(
            transform, fixed.grid, moving.grid, then=affine, info=info
        )
    timings["refine" if refine else "resample"] = time.perf_counter() - t2
    result.info["timings"] = timings
    result.info["seconds"] = time.perf_counter() - t0
    return result
