"""Registration by a trained network, in physical space, with optional refinement.

1. **pre-alignment**: the classical preset the model was trained after (``affine`` for the
   shipped brain model) registers the pair;
2. **prediction**: both images are put on the model's network grid (the training spacing
   over the fixed image's field of view), the moving one through the affine, and the network
   predicts the deformable part there;
3. **refinement** (``refine=N``): N iterations of the classical deformable stage on the
   pair at the model's resolution, starting from the network's field (a smooth residual
   velocity is added to the predicted one, so the result stays diffeomorphic);
4. the fields are resampled onto the fixed image's grid, giving a
   :class:`~learnreg.spatial.RegistrationResult` ``x ↦ A(x + u(x))`` that warps, inverts and
   saves itself like a classical one.
"""

from __future__ import annotations

import time

import torch

from learnreg.core.image import Image
from learnreg.optimize.classical import Progress, check_pair, register
from learnreg.optimize.config import ClassicalConfig, DeformableStage
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.result import RegistrationResult
from learnreg.zoo.models import PretrainedModel

__all__ = ["predict", "refinement_config"]


def refinement_config(
    model: PretrainedModel, fixed: Image, iterations: int, velocity: bool
) -> ClassicalConfig:
    """The classical stage that refines a prediction: LNCC at the model's resolution, the
    residual velocity (or displacement) on a grid twice coarser, ``iterations`` steps."""
    spacing = min(model.preprocessor.network.spacing or model.reference.spacing)
    shrink = max(1.0, float(spacing) / min(fixed.grid.spacing))
    return ClassicalConfig(
        linear=[],
        deformable=DeformableStage(
            model="svf" if velocity else "displacement",
            shrink=(shrink,),
            velocity_shrink=(2.0 * shrink,),
            iterations=(int(iterations),),
            learning_rate=0.25,
        ),
    ).validate()


def predict(
    fixed: Image,
    moving: Image,
    model: PretrainedModel,
    refine: int = 0,
    progress: Progress | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with ``model`` (+ ``refine`` optimization steps)."""
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    check_pair(fixed, moving)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if model.prealign is not None:
        affine = register(fixed, moving, model.prealign, progress=progress).linear()
    else:
        affine = AffineTransform.identity(fixed.ndim)
    timings["prealign"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    grid = model.grid_for(fixed)
    pre = model.preprocessor
    f = pre.image(fixed, grid).batch()
    m = pre.image(moving, grid, affine).batch()
    out = model.method.predict(f, m)
    if out.velocity is not None:
        coarse = grid.resized(out.velocity.shape[2:])
        initial = DisplacementField(coarse, out.velocity)
    else:
        initial = DisplacementField(grid, out.displacement)
    timings["network"] = time.perf_counter() - t1

    info = {
        "method": "model",
        "model": model.name,
        "network": model.method.name,
        "prealign": model.prealign,
        "network_grid": grid.to_dict(),
        "refine": int(refine),
    }
    t2 = time.perf_counter()
    if refine:
        cfg = refinement_config(model, fixed, refine, out.velocity is not None)
        refined = register(
            fixed, moving, cfg, initial=affine, progress=progress, initial_field=initial
        )
        fwd, inv = refined.deformable, refined.inverse_deformable
        info["refinement"] = cfg.to_dict()
    else:
        with torch.no_grad():
            fwd = DisplacementField(grid, out.displacement).resampled(fixed.grid)
            backward = model.method.inverse_displacement(out)
            inv = DisplacementField(grid, backward).resampled(fixed.grid)
    timings["refine"] = time.perf_counter() - t2
    info["timings"] = timings
    info["seconds"] = time.perf_counter() - t0
    return RegistrationResult(fixed.grid, moving.grid, affine, fwd, inv, info)
