"""ITK/ANTs transform files: affine ``.mat``/``.txt``/``.tfm``, displacement fields, ``.h5``.

Conventions (verified empirically in ``tests/io/test_transforms.py`` against SimpleITK 2.5 and
antspyx 0.6 / ANTs):

- Every transform maps points of the *fixed* space to the *moving* space (ITK convention); a
  registration result is our ``TransformChain([field, affine])``, i.e.
  ``x_moving = A(x + u(x))``, points going through the chain in list order.
- Files are LPS, as ITK/ANTs write them: the homogeneous RAS matrix ``M`` is stored as
  ``F M F`` with ``F = diag(-1, -1, 1[, 1])``; field vectors are LPS millimetres on the field's
  grid, whose NIfTI header is ordinary RAS (ITK converts it). ``.mat`` is ITK's binary MATLAB
  format (ANTs' ``0GenericAffine.mat``), ``.txt``/``.tfm`` ITK text; fields are 5D
  ``(X, Y, Z, 1, 3)`` NIfTI with vector intent, like ANTs' ``1Warp.nii.gz``.
- **antsApplyTransforms / ants.apply_transforms**: pass files in our chain order, i.e. the
  order in which they act on fixed points: ``-t warp.nii.gz -t affine.mat`` /
  ``transformlist=["warp.nii.gz", "affine.mat"]`` reproduces
  ``resample(moving, fixed_grid, TransformChain([field, affine]))``. This is exactly ANTs'
  ``fwdtransforms = [1Warp.nii.gz, 0GenericAffine.mat]``, and :func:`read_transforms` reads
  such a list into the same chain. ``ants.apply_transforms_to_points`` with the same list maps
  *fixed* points to moving space (points in LPS), like ``TransformChain.__call__``.
  (antspyx forwards ``transformlist`` to antsApplyTransforms as ``-t`` options in the same
  order.)
- **antspyx gotcha**: ``ants.apply_transforms``/``apply_transforms_to_points`` given exactly
  two files, a ``.mat`` first and a non-``.mat`` second, silently default to
  ``whichtoinvert=(True, False)`` (it assumes ANTs' ``invtransforms``). To apply the chain
  ``[affine, field]`` pass ``whichtoinvert=[False, False]`` explicitly.
- **Inverse files**: ANTs' ``invtransforms = [0GenericAffine.mat, 1InverseWarp.nii.gz]`` with
  ``whichtoinvert=[True, False]`` (``-t [0GenericAffine.mat,1] -t 1InverseWarp.nii.gz``)
  maps moving points to fixed: ``x = y' + v(y')`` with ``y' = A⁻¹ y``; ``1InverseWarp`` lives on
  the fixed grid like ``1Warp``. Read it as
  ``read_transforms([("0GenericAffine.mat", True), "1InverseWarp.nii.gz"])``.
- **SimpleITK**: ``CompositeTransform`` applies the *last added* transform to points first,
  so add the files in reverse chain order: ``AddTransform(affine)`` then
  ``AddTransform(DisplacementFieldTransform(field))``; :func:`to_sitk_transform` does this.
  ``DisplacementFieldTransform`` needs a ``sitkVectorFloat64`` image
  (``sitk.Cast(sitk.ReadImage(f), sitk.sitkVectorFloat64)``). ITK ``.h5`` composites list
  their transforms in that same add order; :func:`from_sitk_transform` reverses them.
- Near the border of a field's grid ITK clamps while our sampler fades the displacement to
  zero over the last voxel; warps agree inside that margin.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.core.locale_guard import keep_locale
from learnreg.io.images import (
    _lps_flip,
    _short,
    _sitk_geometry,
    atomic_write,
    extension,
    from_sitk_image,
    read_image,
)
from learnreg.io.validate import check_stream_complete
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.base import SpatialTransform, TransformChain
from learnreg.spatial.displacement import DisplacementField

__all__ = [
    "AFFINE_EXTENSIONS",
    "FIELD_EXTENSIONS",
    "read_affine",
    "write_affine",
    "read_displacement",
    "write_displacement",
    "read_transform",
    "read_transforms",
    "write_transform",
    "to_sitk_transform",
    "from_sitk_transform",
    "as_displacement",
]

AFFINE_EXTENSIONS = (".mat", ".txt", ".tfm")
COMPOSITE_EXTENSIONS = (".h5", ".hdf5")
FIELD_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
TRANSFORM_EXTENSIONS = AFFINE_EXTENSIONS + COMPOSITE_EXTENSIONS + FIELD_EXTENSIONS

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------- helpers
def _homogeneous_flip(ndim: int) -> np.ndarray:
    f = np.eye(ndim + 1)
    f[:ndim, :ndim] = _lps_flip(ndim)
    return f


def _ras_to_lps_matrix(m: np.ndarray) -> np.ndarray:
    """Conjugate a homogeneous world matrix by the RAS/LPS flip (its own inverse)."""
    f = _homogeneous_flip(m.shape[0] - 1)
    return f @ m @ f


def _check_path(path: PathLike, allowed: tuple[str, ...], what: str) -> tuple[Path, str]:
    path = Path(path)
    ext = extension(path)
    if ext not in allowed:
        raise InputError(
            f"{path}: unsupported {what} extension {ext or '(none)'!r}; "
            f"expected one of {', '.join(allowed)}"
        )
    return path, ext


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a transform file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")


def _single_matrix(transform: AffineTransform, path: PathLike) -> np.ndarray:
    m = transform.homogeneous().detach().cpu().double().numpy()
    if m.shape[0] != 1:
        raise InputError(f"{path}: can only write one affine, got a batch of {m.shape[0]}")
    return m[0]


# ---------------------------------------------------------------------------- SimpleITK
def _sitk_affine(matrix_ras: np.ndarray):
    import SimpleITK as sitk

    d = matrix_ras.shape[0] - 1
    m = _ras_to_lps_matrix(np.asarray(matrix_ras, dtype=np.float64))
    tx = sitk.AffineTransform(d)
    tx.SetMatrix(tuple(map(float, m[:d, :d].ravel())))
    tx.SetTranslation(tuple(map(float, m[:d, d])))
    tx.SetCenter((0.0,) * d)
    return tx


def _linear_matrix_ras(tx) -> np.ndarray:
    """Homogeneous RAS matrix of any linear SimpleITK transform (by mapping a basis)."""
    d = tx.GetDimension()
    o = np.asarray(tx.TransformPoint((0.0,) * d), dtype=np.float64)
    m = np.eye(d + 1)
    for i in range(d):
        e = [0.0] * d
        e[i] = 1.0
        m[:d, i] = np.asarray(tx.TransformPoint(tuple(e)), dtype=np.float64) - o
    m[:d, d] = o
    return _ras_to_lps_matrix(m)


def _field_image(field: DisplacementField, dtype=np.float64):
    """A DisplacementField as a SimpleITK vector image: LPS vectors (mm) on the LPS grid."""
    import SimpleITK as sitk

    w = field.world_field().detach().cpu().double()
    if w.shape[0] != 1:
        raise ValueError(f"can only export one displacement field, got a batch of {w.shape[0]}")
    v = w[0].numpy().copy()  # (D, *S), RAS mm
    v[:2] *= -1.0  # RAS -> LPS vector components
    d = v.shape[0]
    arr = np.transpose(v, (*range(d, 0, -1), 0))  # (*S reversed, D): sitk (k, j, i, c)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=dtype), isVector=True)
    spacing, origin, direction = _sitk_geometry(field.grid)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _field_from_image(img, where) -> DisplacementField:
    d = img.GetDimension()
    n = img.GetNumberOfComponentsPerPixel()
    if d not in (2, 3) or n != d:
        raise InputError(
            f"{where}: not a displacement field: expected a 2D/3D vector image with one "
            f"component per dimension, got size {img.GetSize()} with {n} component(s) per "
            "pixel (ITK/ANTs fields are e.g. 5D NIfTI (X, Y, Z, 1, 3) with vector intent)"
        )
    return _field_from_vectors(from_sitk_image(img, str(where), allow_channels=True, path=where))


def _field_from_vectors(image: Image) -> DisplacementField:
    """An image of LPS mm vectors, one channel per axis, as a field (RAS)."""
    where = image.name
    if image.channels != image.grid.ndim and image.channels == 1:
        raise InputError(
            f"{where}: not a displacement field: a scalar image (ITK/ANTs fields hold one "
            "vector component per axis, e.g. NIfTI (X, Y, Z, 1, 3) with vector intent)"
        )
    vec = image.data.double().clone()  # (D, *S), LPS mm
    if vec.shape[0] != image.grid.ndim:
        raise InputError(
            f"{where}: displacement field has {vec.shape[0]} components on a "
            f"{image.grid.ndim}D grid {image.grid.shape}"
        )
    if not torch.isfinite(vec).all():
        raise InputError(f"{where}: displacement field contains NaN or infinite values")
    vec[:2] *= -1.0  # LPS -> RAS
    return DisplacementField.from_world(image.grid, vec[None].float())


def _to_sitk_single(t: SpatialTransform, grid: Grid | None):
    import SimpleITK as sitk

    if isinstance(t, AffineTransform):
        m = t.homogeneous().detach().cpu().double().numpy()
        if m.shape[0] != 1:
            raise ValueError(f"can only export one affine, got a batch of {m.shape[0]}")
        return _sitk_affine(m[0])
    if isinstance(t, TransformChain):
        return to_sitk_transform(t, grid)
    if not isinstance(t, DisplacementField):
        if grid is None:
            raise TypeError(
                f"{type(t).__name__} has no ITK equivalent; pass grid= to export it as a "
                "displacement field sampled on that grid"
            )
        t = as_displacement(t, grid)
    return sitk.DisplacementFieldTransform(_field_image(t, np.float64))


def to_sitk_transform(transform: SpatialTransform, grid: Grid | None = None):
    """A SimpleITK ``CompositeTransform`` that maps points exactly as ``transform`` does.

    World points are LPS on the SimpleITK side. SimpleITK applies the *last added* transform
    to points first, so a chain ``[t1, t2, ...]`` (``t1`` applied first) is added in reverse.
    Affine transforms become ``sitk.AffineTransform``, displacement fields
    ``sitk.DisplacementFieldTransform``; any other transform is sampled as a displacement
    field on ``grid`` (required then).
    """
    import SimpleITK as sitk

    parts = list(transform.transforms) if isinstance(transform, TransformChain) else [transform]
    comp = sitk.CompositeTransform(transform.ndim)
    for t in reversed(parts):
        comp.AddTransform(_to_sitk_single(t, grid))
    return comp


def from_sitk_transform(tx, where: str = "<transform>") -> SpatialTransform:
    """A SimpleITK transform as ours: linear → AffineTransform, displacement field →
    DisplacementField, composite → TransformChain (in point order, i.e. reversed)."""
    import SimpleITK as sitk

    d = tx.GetDimension()
    if d not in (2, 3):
        raise InputError(f"{where}: {d}D transform not supported; expected 2D or 3D")
    if tx.IsLinear():
        return AffineTransform(torch.from_numpy(_linear_matrix_ras(tx)).float())
    if isinstance(tx, sitk.CompositeTransform):
        parts = [
            from_sitk_transform(tx.GetNthTransform(i), where)
            for i in range(tx.GetNumberOfTransforms())
        ]
        if not parts:
            raise InputError(f"{where}: composite transform is empty")
        return TransformChain(list(reversed(parts)))
    if isinstance(tx, sitk.DisplacementFieldTransform):
        return _field_from_image(tx.GetDisplacementField(), where)
    raise InputError(
        f"{where}: unsupported transform type {tx.GetName()}; expected linear (affine, rigid, "
        "...), displacement field or a composite of those"
    )


def as_displacement(transform: SpatialTransform, grid: Grid) -> DisplacementField:
    """Any transform sampled as a dense displacement field on ``grid`` (e.g. for export)."""
    u = transform.displacement(grid).detach().float()
    if u.shape[0] != 1:
        raise ValueError(f"can only export one transform, got a batch of {u.shape[0]}")
    return DisplacementField.from_world(grid, u)


# ---------------------------------------------------------------------------- affine files
@keep_locale()
def write_affine(path: PathLike, transform: AffineTransform | torch.Tensor | np.ndarray) -> Path:
    """Write an affine as an ITK transform file (LPS), atomically.

    ``.mat`` is ITK's binary MATLAB format (what ANTs writes as ``0GenericAffine.mat``);
    ``.txt``/``.tfm`` the ITK text format; both hold ``AffineTransform_double_D_D`` with
    centre 0. Accepts an :class:`AffineTransform` or a homogeneous RAS matrix.
    """
    import SimpleITK as sitk

    path, _ = _check_path(path, AFFINE_EXTENSIONS + COMPOSITE_EXTENSIONS, "affine transform")
    if not isinstance(transform, AffineTransform):
        transform = AffineTransform(torch.as_tensor(np.asarray(transform, dtype=np.float64)))
    m = _single_matrix(transform, path)
    if not np.isfinite(m).all():
        raise InputError(f"{path}: affine matrix contains NaN or infinite values")
    tx = _sitk_affine(m)
    with atomic_write(path) as tmp:
        try:
            sitk.WriteTransform(tx, str(tmp))
        except RuntimeError as e:
            raise InputError(f"{path}: cannot write transform ({_short(e)})") from None
    return path


@keep_locale()
def _read_sitk_transform(path: PathLike, allowed: tuple[str, ...], what: str):
    import SimpleITK as sitk

    path, _ = _check_path(path, allowed, what)
    _check_exists(path)
    try:
        return path, sitk.ReadTransform(str(path))
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read transform ({_short(e)})") from None


def read_affine(path: PathLike, *, invert: bool = False) -> AffineTransform:
    """Read any linear ITK/ANTs transform file (affine, rigid/Euler, similarity, versor,
    MatrixOffsetTransformBase, with any centre) as a RAS :class:`AffineTransform`.

    ``invert=True`` returns its inverse (ANTs' ``[0GenericAffine.mat, 1]``).
    """
    path, tx = _read_sitk_transform(path, AFFINE_EXTENSIONS + COMPOSITE_EXTENSIONS, "affine")
    if not tx.IsLinear():
        raise InputError(f"{path}: not a linear transform ({tx.GetName()})")
    d = tx.GetDimension()
    if d not in (2, 3):
        raise InputError(f"{path}: {d}D transform not supported; expected 2D or 3D")
    m = _linear_matrix_ras(tx)
    if not np.isfinite(m).all() or abs(np.linalg.det(m)) < 1e-12:
        raise InputError(f"{path}: affine matrix is singular or not finite")
    if invert:
        m = np.linalg.inv(m)
    return AffineTransform(torch.from_numpy(m).float())


# ---------------------------------------------------------------------------- fields
@keep_locale()
def write_displacement(
    path: PathLike,
    field: DisplacementField | SpatialTransform,
    *,
    grid: Grid | None = None,
    dtype: np.dtype | str = np.float32,
) -> Path:
    """Write a displacement field in ITK/ANTs convention, atomically.

    The file's geometry is the field's grid and its vectors are LPS millimetres, as
    ``antsApplyTransforms`` and SimpleITK's ``DisplacementFieldTransform`` read them; a
    ``.nii.gz`` is the 5D ``(X, Y, Z, 1, 3)`` NIfTI with vector intent that ANTs writes.
    A transform other than a :class:`DisplacementField` is sampled on ``grid`` first.
    """
    import SimpleITK as sitk

    path, _ = _check_path(path, FIELD_EXTENSIONS, "displacement field")
    if not isinstance(field, DisplacementField):
        if grid is None:
            raise InputError(
                f"{path}: {type(field).__name__} is not a displacement field; pass grid= to "
                "sample it"
            )
        field = as_displacement(field, grid)
    elif grid is not None and not grid.allclose(field.grid):
        field = as_displacement(field, grid)
    if field.field.shape[0] != 1:
        raise InputError(f"{path}: can only write one field, got a batch of {field.field.shape[0]}")
    img = _field_image(field, np.dtype(dtype))
    with atomic_write(path) as tmp:
        try:
            sitk.WriteImage(img, str(tmp))
        except RuntimeError as e:
            raise InputError(f"{path}: cannot write displacement field ({_short(e)})") from None
    return path


@keep_locale()
def read_displacement(path: PathLike) -> DisplacementField:
    """Read an ITK/ANTs displacement field (LPS vectors in mm), e.g. ANTs' ``1Warp.nii.gz``."""
    import SimpleITK as sitk

    path, ext = _check_path(path, FIELD_EXTENSIONS, "displacement field")
    _check_exists(path)
    if ext in (".nii", ".nii.gz"):  # nibabel keeps NaN, which ITK's NIfTI reader turns to 0
        image = read_image(path, allow_channels=True, dtype=torch.float64)
        return _field_from_vectors(image)
    check_stream_complete(path, "displacement field")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read displacement field ({_short(e)})") from None
    return _field_from_image(img, path)


# ---------------------------------------------------------------------------- dispatch
def read_transform(path: PathLike, *, invert: bool = False) -> SpatialTransform:
    """Read one transform file, choosing the reader from the extension.

    ``.mat``/``.txt``/``.tfm``/``.h5`` are read with SimpleITK (linear → AffineTransform,
    composite → TransformChain); ``.nii[.gz]``/``.nrrd``/``.mha``/``.mhd`` are displacement
    fields. ``invert=True`` inverts it (exact for affines; fields need an ``inverse``).
    """
    path, ext = _check_path(path, TRANSFORM_EXTENSIONS, "transform")
    if ext in FIELD_EXTENSIONS:
        t: SpatialTransform = read_displacement(path)
    else:
        path, tx = _read_sitk_transform(path, AFFINE_EXTENSIONS + COMPOSITE_EXTENSIONS, "transform")
        t = from_sitk_transform(tx, str(path))
    if invert:
        try:
            t = t.inverse()
        except NotImplementedError:
            raise InputError(
                f"{path}: this transform cannot be inverted here; pass its inverse file "
                "instead (e.g. ANTs' 1InverseWarp.nii.gz)"
            ) from None
    return t


def read_transforms(paths: Sequence[PathLike | tuple[PathLike, bool]]) -> TransformChain:
    """Read a list of transform files in ANTs order as one chain.

    ``paths`` is in the order ``antsApplyTransforms -t`` / ``ants.apply_transforms``
    ``transformlist`` takes them (e.g. ``[1Warp.nii.gz, 0GenericAffine.mat]``); an item may be
    ``(path, invert)`` like ANTs' ``[file, 1]``. See the module docstring for the order.
    """
    if not paths:
        raise InputError("no transform files given")
    ts = []
    for p in paths:
        if isinstance(p, tuple):
            p, inv = p
        else:
            inv = False
        ts.append(read_transform(p, invert=bool(inv)))
    return TransformChain(ts)


@keep_locale()
def write_transform(
    path: PathLike, transform: SpatialTransform, *, grid: Grid | None = None
) -> Path:
    """Write a transform to the file type its extension names.

    Affine → ``.mat``/``.txt``/``.tfm``; a field (or any transform sampled on ``grid``) →
    ``.nii.gz`` etc.; anything, including chains, → ``.h5`` as an ITK ``CompositeTransform``
    that SimpleITK and ``antsApplyTransforms`` replay.
    """
    import SimpleITK as sitk

    path, ext = _check_path(path, TRANSFORM_EXTENSIONS, "transform")
    if ext in FIELD_EXTENSIONS:
        return write_displacement(path, transform, grid=grid)
    if ext in AFFINE_EXTENSIONS:
        if not isinstance(transform, AffineTransform):
            raise InputError(
                f"{path}: {type(transform).__name__} is not affine; write it as .h5 or as a "
                "displacement field (.nii.gz)"
            )
        return write_affine(path, transform)
    try:
        tx = to_sitk_transform(transform, grid)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: {e}") from None
    with atomic_write(path) as tmp:
        try:
            sitk.WriteTransform(tx, str(tmp))
        except RuntimeError as e:
            raise InputError(f"{path}: cannot write transform ({_short(e)})") from None
    return path
