"""Evaluation outputs people read: statistics (bootstrap CIs, paired tests), reports and
quality-control figures. The metrics themselves are :mod:`learnreg.metrics`."""

from learnreg.eval.figures import checkerboard, deformation_grid_lines, qc_figure, save_figure

__all__ = ["checkerboard", "deformation_grid_lines", "qc_figure", "save_figure"]
