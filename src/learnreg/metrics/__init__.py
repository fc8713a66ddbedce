"""Registration metrics: Dice, surface distances (HD95), TRE, Jacobian statistics, inverse
consistency. Numpy or torch in, plain Python floats / dicts out; 2D and 3D; spacing-aware.

Definitions follow the Learn2Reg evaluation code where it has one (see each function).
Label maps and displacement fields are in array index order ``(i, j[, k])`` on the fixed grid;
displacements are in voxel units of that grid unless stated otherwise. This package sits low
in the layering (below ``methods``), so methods, training validation, the command line and the
evaluation runner all score with the same functions; :func:`score_result` is the one function
that scores a whole :class:`~learnreg.spatial.result.RegistrationResult` (Dice, HD95, TRE,
Jacobian, inverse consistency, time) for all of them.
"""

from learnreg.metrics.deformation import (
    determinant_stats,
    inverse_consistency_error,
    jacobian_stats,
)
from learnreg.metrics.landmarks import tre
from learnreg.metrics.overlap import dice_per_label, mean_dice
from learnreg.metrics.score import METRICS, score_result
from learnreg.metrics.surface import hausdorff_distance, hd95, robust_hausdorff, surface_distances

__all__ = [
    "dice_per_label",
    "mean_dice",
    "surface_distances",
    "robust_hausdorff",
    "hausdorff_distance",
    "hd95",
    "tre",
    "jacobian_stats",
    "determinant_stats",
    "inverse_consistency_error",
    "METRICS",
    "score_result",
]
