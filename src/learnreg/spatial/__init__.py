"""Differentiable sampling and spatial transform models (fixed-to-moving, world mm)."""

from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.base import SpatialTransform, TransformChain
from learnreg.spatial.bspline import BSplineTransform, bspline_kernel, evaluate_bspline
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.factory import create_transform
from learnreg.spatial.fields import (
    FieldInverse,
    compose_displacements,
    invert_displacement,
    resize_displacement,
)
from learnreg.spatial.homography import Homography
from learnreg.spatial.linear import (
    Affine,
    Rigid,
    Similarity,
    Translation,
    compose_affine,
    rotation_matrix,
)
from learnreg.spatial.sampling import resample, sample, sample_index, warp
from learnreg.spatial.svf import StationaryVelocityField, integrate_velocity
from learnreg.spatial.tps import ThinPlateSpline

__all__ = [
    "Affine",
    "AffineTransform",
    "BSplineTransform",
    "DisplacementField",
    "FieldInverse",
    "Homography",
    "Rigid",
    "Similarity",
    "SpatialTransform",
    "StationaryVelocityField",
    "ThinPlateSpline",
    "TransformChain",
    "Translation",
    "bspline_kernel",
    "compose_affine",
    "compose_displacements",
    "create_transform",
    "evaluate_bspline",
    "integrate_velocity",
    "invert_displacement",
    "resample",
    "resize_displacement",
    "rotation_matrix",
    "sample",
    "sample_index",
    "warp",
]
