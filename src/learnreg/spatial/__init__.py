"""Differentiable sampling and spatial transform models (fixed-to-moving, world mm)."""

from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.base import SpatialTransform, TransformChain
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.sampling import resample, sample, sample_index, warp

__all__ = [
    "AffineTransform",
    "DisplacementField",
    "SpatialTransform",
    "TransformChain",
    "resample",
    "sample",
    "sample_index",
    "warp",
]
