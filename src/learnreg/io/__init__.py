"""Reading and writing images, transforms (ITK/ANTs files) and point sets in RAS world space."""

from learnreg.io.images import (
    from_sitk_image,
    read_image,
    read_labels,
    to_sitk_image,
    write_image,
)
from learnreg.io.points import read_point_table, read_points, write_points
from learnreg.io.transforms import (
    as_displacement,
    from_sitk_transform,
    read_affine,
    read_displacement,
    read_transform,
    read_transforms,
    to_sitk_transform,
    write_affine,
    write_displacement,
    write_transform,
)

__all__ = [
    "as_displacement",
    "from_sitk_image",
    "from_sitk_transform",
    "read_affine",
    "read_displacement",
    "read_image",
    "read_labels",
    "read_point_table",
    "read_points",
    "read_transform",
    "read_transforms",
    "to_sitk_image",
    "to_sitk_transform",
    "write_affine",
    "write_displacement",
    "write_image",
    "write_points",
    "write_transform",
]
