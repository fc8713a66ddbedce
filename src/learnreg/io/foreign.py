"""Affines in the formats of FSL (FLIRT ``.mat``) and FreeSurfer (``.lta``), written through
``nitransforms`` (NiPy's converter, an optional dependency: ``pip install 'learnreg[formats]'``)
rather than by hand. Both formats need the two images' geometry (FLIRT works in scaled voxel
coordinates, LTA records both volumes), so they are written from the result's grids; both
are 3D only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from learnreg.core.errors import InputError
from learnreg.core.files import atomic_write
from learnreg.core.grid import Grid
from learnreg.spatial.affine import AffineTransform

__all__ = ["FOREIGN_FORMATS", "write_foreign_affine", "read_foreign_affine"]

FOREIGN_FORMATS = {"fsl": ("fsl", "affine_flirt.mat"), "lta": ("fs", "affine.lta")}
"""learnreg's name → (nitransforms' format name, file name in a result folder)."""


def _nitransforms():
    try:
        from nitransforms import linear
    except ImportError:
        raise InputError(
            "FSL and FreeSurfer (LTA) transforms are written with nitransforms: "
            "pip install 'learnreg[formats]'"
        ) from None
    return linear


def _volume(grid: Grid, what: str):
    import nibabel as nib

    if grid.ndim != 3:
        raise InputError(f"FSL and LTA transforms are 3D; the {what} image is {grid.ndim}D")
    return nib.Nifti1Image(np.zeros(grid.shape, dtype=np.uint8), grid.affine)


def write_foreign_affine(
    path: str | os.PathLike,
    affine: AffineTransform,
    fixed_grid: Grid,
    moving_grid: Grid,
    fmt: str,
) -> Path:
    """Write the fixed → moving ``affine`` (world RAS) as FSL FLIRT (``fmt="fsl"``: moving →
    fixed in scaled voxels, for ``flirt -applyxfm -init FILE -in moving -ref fixed``) or a
    FreeSurfer LTA (``"lta"``: RAS to RAS, source = moving, destination = fixed)."""
    if fmt not in FOREIGN_FORMATS:
        raise InputError(
            f"unknown transform format {fmt!r}; expected one of {sorted(FOREIGN_FORMATS)}"
        )
    linear = _nitransforms()
    matrix = affine.homogeneous()[0].detach().double().numpy()
    xfm = linear.Affine(matrix, reference=_volume(fixed_grid, "fixed"))
    path = Path(path)
    with atomic_write(path) as tmp:
        xfm.to_filename(
            str(tmp), fmt=FOREIGN_FORMATS[fmt][0], moving=_volume(moving_grid, "moving")
        )
    return path


def read_foreign_affine(
    path: str | os.PathLike, fixed_grid: Grid, moving_grid: Grid, fmt: str
) -> AffineTransform:
    """Read what :func:`write_foreign_affine` wrote (or FSL/FreeSurfer did) as the fixed →
    moving world affine."""
    import torch

    linear = _nitransforms()
    try:
        xfm = linear.load(
            str(path),
            fmt=FOREIGN_FORMATS[fmt][0],
            reference=_volume(fixed_grid, "fixed"),
            moving=_volume(moving_grid, "moving"),
        )
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read {fmt} transform ({e})") from None
    return AffineTransform(
        torch.from_numpy(np.asarray(xfm.matrix, dtype=np.float64).reshape(4, 4)).float()
    )
