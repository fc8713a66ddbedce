"""Initial momenta of classical LDDMM registrations: Quicksilver's supervision (Yang 2017).

Yang, Kwitt, Styner and Niethammer, "Quicksilver: fast predictive image registration — a deep
learning approach", NeuroImage 2017, trained their network on the initial momenta that an
optimization-based LDDMM (PyCA's shooting) produced for the training pairs. Here the
optimization is learnreg's own classical LDDMM (:mod:`learnreg.spatial.lddmm`, deformable
stage only, from the identity): geodesic shooting optimized over the initial momentum coarse
to fine, the last level's momentum on the image grid itself (Quicksilver predicts one
momentum vector per voxel). Momenta are computed once per (atlas, subject, grid, settings) and
stored (:class:`~learnreg.data.reference_fields.ReferencePairs`); the source
``data.synthetic: {kind: lddmm-momenta}`` builds LPBA40 atlas → subject pairs with them.

Measured on S01 ← S11 at 4 mm (40×48×40, one core): label Dice 0.469 → 0.631 in 90 s with
levels 1/2, 1 (60, 30 iterations); levels 1/4, 1/2, 1 (60, 30, 10): 0.622 in 47 s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from learnreg.core.image import Image
from learnreg.data.preprocess import Preprocessor
from learnreg.data.reference_fields import SOURCE_DEFAULTS, ReferencePairs, reference_source
from learnreg.data.sources import register_source
from learnreg.data.synthetic import source_options
from learnreg.metrics import mean_dice
from learnreg.optimize.classical import register
from learnreg.optimize.config import DEFAULT_KERNEL, ClassicalConfig, DeformableStage
from learnreg.spatial.lddmm import GeodesicShooting

__all__ = [
    "momentum_registration_config",
    "lddmm_momentum",
    "MomentumPairs",
    "lddmm_momentum_source",
]


def momentum_registration_config(
    iterations: Sequence[int] = (60, 30),
    shrink: Sequence[float] = (2, 1),
    kernel: dict | None = None,
    steps: int = 5,
    energy_weight: float = 0.01,
    learning_rate: float = 0.2,
    window: int = 5,
) -> ClassicalConfig:
    """Classical LDDMM without linear stages whose momentum lives on the image grid at every
    level (``velocity_shrink = shrink``, which must end at 1): LNCC (``window``), the
    ``lddmm`` preset's kernel, steps, energy weight and step size by default."""
    shrink = tuple(float(s) for s in shrink)
    if not shrink or shrink[-1] != 1:
        raise ValueError(f"momentum_registration_config: shrink must end at 1, got {shrink}")
    stage = DeformableStage(
        model="lddmm",
        window=int(window),
        shrink=shrink,
        velocity_shrink=shrink,
        iterations=tuple(int(i) for i in iterations),
        learning_rate=float(learning_rate),
        steps=int(steps),
        kernel={**DEFAULT_KERNEL, **(kernel or {})},
        energy_weight=float(energy_weight),
    )
    return ClassicalConfig(linear=[], deformable=stage)


def lddmm_momentum(
    fixed: Image,
    moving: Image,
    config: ClassicalConfig,
    labels: tuple[Image, Image] | None = None,
) -> tuple[torch.Tensor, dict]:
    """The initial momentum ``(D, *fixed.grid.shape)`` (voxels of ``fixed.grid``) of the
    classical LDDMM registration of ``moving`` to ``fixed`` by ``config`` (momentum on the
    image grid, :func:`momentum_registration_config`), and ``seconds``, ``energy``,
    ``min_det_j`` of it; with ``labels = (fixed_labels, moving_labels)`` on the images' grid
    also ``dice_before`` / ``dice_after`` (labels score the result, they never steer it)."""
    if not fixed.grid.allclose(moving.grid, atol=1e-4):
        raise ValueError(f"lddmm_momentum: {moving.name} is not on the grid of {fixed.name}")
    t0 = time.perf_counter()
    result = register(fixed, moving, config)
    geodesic = result.velocity
    if not isinstance(geodesic, GeodesicShooting):
        raise ValueError("lddmm_momentum: the configuration has no lddmm stage")
    if tuple(geodesic.momentum.shape[2:]) != fixed.grid.shape:
        raise ValueError(
            f"lddmm_momentum: the momentum is on {tuple(geodesic.momentum.shape[2:])}, not on "
            f"the image grid {fixed.grid.shape} (the last velocity_shrink must be 1)"
        )
    info = {
        "seconds": time.perf_counter() - t0,
        "energy": float(geodesic.energy()[0]),
        "min_det_j": float(result.jacobian_determinant().min()),
    }
    if labels is not None:
        fl, ml = labels
        structures = sorted(int(v) for v in torch.unique(fl.data) if v != 0)
        info["dice_before"] = mean_dice(fl.data, ml.data, structures)
        info["dice_after"] = mean_dice(fl.data, result.warp(ml, mode="label").data, structures)
    return geodesic.momentum[0].detach().contiguous(), info


class MomentumPairs(ReferencePairs):
    """:class:`~learnreg.data.reference_fields.ReferencePairs` whose references are the
    initial momenta of classical LDDMM between the images (:func:`lddmm_momentum`; ``config``
    default :func:`momentum_registration_config`); the info adds the label Dice on the grid
    before and after."""

    what = "LDDMM momentum"

    def default_config(self) -> ClassicalConfig:
        return momentum_registration_config()

    def compute(self, subject: str, labels: dict[str, Image]) -> tuple[torch.Tensor, dict]:
        fixed, moving = self.grid_images[self.atlas], self.grid_images[subject]
        on_grid = tuple(fixed.with_data(self.labels[n]) for n in (self.atlas, subject))
        return lddmm_momentum(fixed, moving, self.config, on_grid)


_DEFAULTS = {
    **SOURCE_DEFAULTS,
    "iterations": [60, 30],
    "shrink": [2, 1],
    "alpha": DEFAULT_KERNEL["alpha"],
    "steps": 5,
    "energy_weight": 0.01,
    "learning_rate": 0.2,
}


@register_source("lddmm-momenta")
def lddmm_momentum_source(
    options: dict, preprocessor: Preprocessor
) -> tuple[MomentumPairs, MomentumPairs | None]:
    """``data.synthetic: {kind: lddmm-momenta, ...}``: LPBA40 atlas → subject pairs with the
    initial momenta of classical LDDMM between their images (:class:`MomentumPairs`).

    Keys (defaults): ``folder`` (the ``lpba40`` folder), ``atlas`` (S01), ``subjects`` /
    ``val_subjects`` (:data:`~learnreg.data.random_warps.LPBA_TRAIN` /
    :data:`~learnreg.data.random_warps.LPBA_HELDOUT`; ``[]``: no validation), ``cache``
    (default ``$LEARNREG_CACHE/lddmm-momenta``), ``length`` (training items), and the
    registration's ``iterations`` ([60, 30]), ``shrink`` ([2, 1]), kernel ``alpha`` (mm²),
    ``steps``, ``energy_weight``, ``learning_rate``
    (:func:`momentum_registration_config`). The network grid is ``data.shape`` /
    ``data.spacing`` over the atlas's field of view.
    """
    o = source_options("lddmm-momenta", options, _DEFAULTS)
    config = momentum_registration_config(
        o["iterations"],
        o["shrink"],
        {"alpha": float(o["alpha"])},
        int(o["steps"]),
        float(o["energy_weight"]),
        float(o["learning_rate"]),
    )
    return reference_source("lddmm-momenta", o, preprocessor, MomentumPairs, config)
