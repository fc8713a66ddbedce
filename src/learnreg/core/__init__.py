"""Grids and images in physical space; the single place coordinate conventions are converted."""

from learnreg.core.grid import Grid, apply_matrix, to_grid_sample
from learnreg.core.image import Image

__all__ = ["Grid", "Image", "apply_matrix", "to_grid_sample"]
