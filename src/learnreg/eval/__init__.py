"""Evaluation: registration metrics (Dice, HD95, TRE, Jacobian statistics, inverse
consistency) and quality-control figures."""

from learnreg.eval.figures import checkerboard, deformation_grid_lines, qc_figure, save_figure
from learnreg.eval.metrics import (
    dice_per_label,
    hausdorff_distance,
    hd95,
    inverse_consistency_error,
    jacobian_stats,
    mean_dice,
    robust_hausdorff,
    surface_distances,
    tre,
)

__all__ = [
    "checkerboard",
    "deformation_grid_lines",
    "dice_per_label",
    "hausdorff_distance",
    "hd95",
    "inverse_consistency_error",
    "jacobian_stats",
    "mean_dice",
    "qc_figure",
    "robust_hausdorff",
    "save_figure",
    "surface_distances",
    "tre",
]
