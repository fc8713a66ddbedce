"""Reading and writing images in physical space.

NIfTI (``.nii``, ``.nii.gz``) goes through nibabel and keeps the data array's index order and
the sform/qform affine (``img.affine``, RAS+ mm) as the :class:`~learnreg.core.Grid`. NRRD,
MetaImage (``.mha``/``.mhd``), PNG/JPG/BMP/TIFF and DICOM (a single ``.dcm`` file, or a folder
holding a series) go through SimpleITK; its LPS geometry is converted to RAS by flipping the
sign of the first two world axes, and its ``(k, j, i)`` arrays are transposed to ``(i, j, k)``.
Those two conversions happen here and nowhere else (:func:`from_sitk_image`,
:func:`to_sitk_image`).

Shapes: ``(X, Y)`` and ``(X, Y, 1)`` are 2D images; ``(X, Y, Z)`` is 3D; a last axis of
channels (``(X, Y, Z, C)``, or ITK's vector layout ``(X, Y, Z, 1, C)``) is refused unless
``allow_channels=True``. RGB(A) PNG/JPG/BMP/TIFF images are converted to grayscale luminance
(ITU-R BT.601 weights, as Pillow's ``convert("L")``).

Every problem with a file raises :class:`~learnreg.core.errors.InputError` with a one-line
message that names the file. Writes are atomic: the file is written in a temporary folder
beside the target and moved into place with :func:`os.replace`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from learnreg.core.errors import InputError
from learnreg.core.files import atomic_write
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.core.locale_guard import keep_locale
from learnreg.io.validate import (
    check_fits_in_memory,
    check_index_to_world,
    check_looks_like_labels,
    check_stream_complete,
)

__all__ = [
    "read_image",
    "read_labels",
    "write_image",
    "from_sitk_image",
    "to_sitk_image",
    "label_array",
    "image_from_array",
    "atomic_write",
    "IMAGE_EXTENSIONS",
]

log = logging.getLogger(__name__)

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm") + RASTER_EXTENSIONS
IMAGE_EXTENSIONS = NIFTI_EXTENSIONS + SITK_EXTENSIONS
WRITE_EXTENSIONS = tuple(e for e in IMAGE_EXTENSIONS if e != ".dcm")
_LUMA = np.array([0.299, 0.587, 0.114])

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------- helpers
def extension(path: PathLike) -> str:
    """Lower-case extension, with ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _lps_flip(ndim: int) -> np.ndarray:
    """``diag(-1, -1[, 1])``: RAS ↔ LPS (its own inverse)."""
    f = np.ones(ndim)
    f[:2] = -1.0
    return np.diag(f)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        return
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")


def _check_extension(path: Path, allowed: tuple[str, ...], what: str) -> str:
    ext = extension(path)
    if ext not in allowed:
        raise InputError(
            f"{path}: unsupported {what} extension {ext or '(none)'!r}; "
            f"expected one of {', '.join(allowed)}"
        )
    return ext


# ---------------------------------------------------------------------------- conversion
def _grid_from_ras_affine(path: PathLike, shape: tuple[int, ...], affine: np.ndarray) -> Grid:
    try:
        return Grid.from_affine(shape, affine)
    except ValueError as e:
        raise InputError(f"{path}: unsupported geometry ({e})") from None


def _spatial_and_channels(
    path: PathLike, arr: np.ndarray, affine4: np.ndarray, allow_channels: bool
) -> tuple[np.ndarray, Grid]:
    """Array in nibabel layout ``(X, Y[, Z[, [1,] C]])`` + 4x4 affine -> ``(C, *S)`` + Grid."""
    shape = arr.shape
    if arr.size == 0:
        raise InputError(f"{path}: image is empty (shape {shape})")
    if arr.ndim == 5 and shape[3] == 1:  # ITK vector layout (X, Y, Z, 1, C)
        arr = arr[:, :, :, 0, :]
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim < 2 or arr.ndim > 4:
        raise InputError(
            f"{path}: {arr.ndim}D image (shape {shape}) not supported; expected 2D or 3D"
        )
    if arr.ndim == 4:
        if not allow_channels:
            raise InputError(
                f"{path}: 4D image (shape {shape}) not supported; expected 2D or 3D "
                "(pass allow_channels=True to read the last axis as channels)"
            )
        data = np.moveaxis(arr, -1, 0)
    else:
        data = arr[None]
    if data.ndim == 3:  # (C, X, Y): a 2D array with a 3D affine
        data = data[..., None]
    # data is (C, X, Y, Z); a single slice with an in-plane affine is a 2D image
    a = np.asarray(affine4, dtype=np.float64)
    check_index_to_world(path, a)
    in_plane = np.allclose(a[:2, 2], 0) and np.allclose(a[2, :2], 0)
    if data.shape[3] == 1 and in_plane:
        grid = _grid_from_ras_affine(path, data.shape[1:3], a[np.ix_([0, 1, 3], [0, 1, 3])])
        return data[..., 0], grid
    return data, _grid_from_ras_affine(path, data.shape[1:], a)


def image_from_array(
    array: np.ndarray, affine: np.ndarray, name: str = "<array>", *, allow_channels: bool = False
) -> Image:
    """An array in nibabel layout (``(X, Y)``, ``(X, Y, Z)``, channels last) with its RAS+ mm
    affine (4×4, as ``nibabel``'s ``img.affine``; 3×3 for a 2D image) as an :class:`Image`."""
    arr = np.asarray(array)
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (3, 3):  # a 2D affine: embed it
        a4 = np.eye(4)
        a4[np.ix_([0, 1, 3], [0, 1, 3])] = a
        a = a4
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InputError(
            f"{name}: affine must be a finite 4x4 (or 3x3 for 2D) matrix, got {a.shape}"
        )
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name}: unsupported array data type {arr.dtype}")
    data, grid = _spatial_and_channels(name, arr, a, allow_channels)
    return Image(_to_torch(data, None), grid, name)


def _to_torch(arr: np.ndarray, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None:
        if dtype.is_floating_point:
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).to(dtype)
        return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)
    if arr.dtype == np.uint16:
        arr = arr.astype(np.int32)
    elif arr.dtype in (np.uint32, np.uint64):
        arr = arr.astype(np.int64)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr))


def from_sitk_image(
    img, name: str = "<image>", *, allow_channels: bool = False, path=None
) -> Image:
    """A SimpleITK image (LPS, ``(k, j, i)`` arrays) as an :class:`Image` (RAS, ``(i, j, k)``).

    Data keep their pixel type (uint16/uint32 widened to int32/int64). A trailing singleton
    third axis makes a 2D image. Multi-component pixels become channels when
    ``allow_channels``, else raise :class:`InputError`.
    """
    import SimpleITK as sitk

    where = path if path is not None else name
    d = img.GetDimension()
    if d not in (2, 3, 4):
        raise InputError(
            f"{where}: {d}D image (size {img.GetSize()}) not supported; expected 2D or 3D"
        )
    arr = sitk.GetArrayViewFromImage(img)
    ncomp = img.GetNumberOfComponentsPerPixel()
    arr = np.array(arr)  # own the memory
    # sitk arrays: (k, j, i) or (k, j, i, c)  ->  nibabel layout (i, j, k[, c])
    if ncomp > 1:
        arr = np.moveaxis(arr, -1, 0)  # (c, k, j, i)
        arr = np.transpose(arr, (0, *range(arr.ndim - 1, 0, -1)))  # (c, i, j, k)
        arr = np.moveaxis(arr, 0, -1)
    else:
        arr = arr.T
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(d, d)
    if d == 4:
        # a 4D ITK image: fourth axis (time/channels) must not be rotated into space
        if not np.allclose(direction[:3, 3], 0) or not np.allclose(direction[3, :3], 0):
            raise InputError(f"{where}: 4D image with a rotated fourth axis is not supported")
        spacing, origin, direction = spacing[:3], origin[:3], direction[:3, :3]
        d = 3
    flip = _lps_flip(d)
    lin = flip @ direction @ np.diag(spacing)
    aff = np.eye(d + 1)
    aff[:d, :d] = lin
    aff[:d, d] = flip @ origin
    if d == 2:
        aff4 = np.eye(4)
        aff4[:2, :2] = aff[:2, :2]
        aff4[:2, 3] = aff[:2, 2]
        aff = aff4
        if ncomp > 1:
            arr = arr[:, :, None, :]  # (i, j, 1, c)
    data, grid = _spatial_and_channels(where, arr, aff, allow_channels)
    return Image(_to_torch(data, None), grid, name)


def _sitk_geometry(grid: Grid) -> tuple[tuple, tuple, tuple]:
    """Spacing, LPS origin and row-major LPS direction of ``grid`` for SimpleITK."""
    flip = _lps_flip(grid.ndim)
    origin = flip @ np.asarray(grid.origin)
    direction = flip @ np.asarray(grid.direction)
    return tuple(grid.spacing), tuple(map(float, origin)), tuple(map(float, direction.ravel()))


def to_sitk_image(image: Image, dtype: np.dtype | str | None = None):
    """An :class:`Image` as a SimpleITK image (LPS geometry; channels as vector pixels)."""
    import SimpleITK as sitk

    arr = image.data.detach().cpu().numpy()
    if dtype is not None:
        arr = arr.astype(dtype)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.shape[0] == 1:
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr[0].T), isVector=False)
    else:
        spatial_rev = tuple(range(arr.ndim - 1, 0, -1))
        img = sitk.GetImageFromArray(
            np.ascontiguousarray(np.transpose(arr, (*spatial_rev, 0))), isVector=True
        )
    spacing, origin, direction = _sitk_geometry(image.grid)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


# ---------------------------------------------------------------------------- reading
def _read_nifti_array(path: Path, labels: bool, dtype: torch.dtype | None):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise InputError(f"{path}: not a NIfTI image ({type(img).__name__})")
        stored = img.get_data_dtype()
        if stored.kind in "cV" or stored.names is not None:
            raise InputError(f"{path}: unsupported NIfTI data type {stored} (RGB/complex)")
        check_fits_in_memory(path, img.shape, stored.itemsize)
        _check_payload_size(path, img)
        if labels or dtype is None or not dtype.is_floating_point:
            arr = np.asanyarray(img.dataobj)
        else:
            arr = img.get_fdata(dtype=np.float64 if dtype == torch.float64 else np.float32)
        affine = _nifti_affine(path, img)
        if arr.size == 0:
            raise InputError(f"{path}: image is empty (shape {img.shape})")
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # nibabel raises many kinds on corrupt/truncated files
        raise InputError(f"{path}: cannot read NIfTI file ({_short(e)})") from None
    if arr.dtype.kind in "cV" or arr.dtype.names is not None:
        raise InputError(f"{path}: unsupported NIfTI data type {arr.dtype} (RGB/complex)")
    return arr, affine


@keep_locale()
def _read_sitk(path: Path):
    import SimpleITK as sitk

    try:
        if path.is_dir():
            if not any(path.iterdir()):
                raise InputError(f"{path}: folder is empty, expected a DICOM series")
            reader = sitk.ImageSeriesReader()
            ids = reader.GetGDCMSeriesIDs(str(path))
            if not ids:
                raise InputError(f"{path}: folder contains no DICOM series")
            files = {sid: reader.GetGDCMSeriesFileNames(str(path), sid) for sid in ids}
            sid = max(ids, key=lambda s: len(files[s]))
            if len(ids) > 1:
                log.warning(
                    "%s: %d DICOM series; reading the largest (%s, %d files)",
                    path,
                    len(ids),
                    sid,
                    len(files[sid]),
                )
            reader.SetFileNames(files[sid])
            return reader.Execute()
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        bytes_per_voxel = 8 * reader.GetNumberOfComponents()  # at most float64 components
        check_fits_in_memory(path, reader.GetSize(), bytes_per_voxel)
        return reader.Execute()
    except InputError:
        raise
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read image ({_short(e)})") from None


def _read_sitk_quietly(path: Path):
    """:func:`_read_sitk` with what ITK's C++ readers print to the process's stderr (MetaIO's
    "data not read completely", GDCM's warnings) kept off the terminal: it becomes the reason
    in the error when the read fails, and is dropped when the read succeeds."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            return _read_sitk(path)
        except InputError as e:
            os.dup2(saved, 2)
            sink.seek(0)
            said = " ".join(sink.read().decode(errors="replace").split())
            if said and "cannot read image" in str(e):
                raise InputError(f"{path}: cannot read image ({said[:200]})") from None
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _short(e: BaseException) -> str:
    """A one-line summary of a library error (SimpleITK's span several lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    for n, ln in enumerate(lines):  # ITK: '<file>:<line>:' then 'ITK ERROR: Class(0x..): text'
        for key in ("Description:", "ERROR:"):
            if key in ln:
                rest = []
                for more in lines[n + 1 :]:
                    if more.startswith(("The usual cause", "Currently registered")):
                        break
                    rest.append(more)
                text = " ".join([ln.split(key, 1)[1].strip(), *rest])
                text = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
                return text[:200]
    return lines[-1][:200]


def _luminance(img):
    """RGB(A) / gray+alpha raster images to one gray channel (float)."""
    import SimpleITK as sitk

    n = img.GetNumberOfComponentsPerPixel()
    if n == 1:
        return img
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    gray = arr[..., :3] @ _LUMA if n >= 3 else arr[..., 0]
    out = sitk.GetImageFromArray(gray.astype(np.float32))
    out.CopyInformation(img)
    return out


def _nifti_affine(path: Path, img) -> np.ndarray:
    """The image's RAS affine — for a header with no orientation (qform_code = sform_code =
    0) the one ITK reads (voxel axes along LPS, origin 0; nibabel's fallback differs in the
    sign of y and centres the image), so that transforms written for it replay in ITK/ANTs."""
    hdr = img.header
    if int(hdr["sform_code"]) > 0 or int(hdr["qform_code"]) > 0:
        return np.asarray(img.affine, dtype=np.float64)
    zooms = [float(z) if np.isfinite(z) and z > 0 else 1.0 for z in hdr.get_zooms()[:3]]
    zooms += [1.0] * (3 - len(zooms))
    log.warning(
        "%s: the NIfTI header gives no orientation (qform_code = sform_code = 0); reading it "
        "as ITK does (voxel axes along L, P, S; origin 0): check that the result is sensible",
        path,
    )
    return np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])


def _check_payload_size(path: Path, img) -> None:
    """An uncompressed NIfTI must hold the bytes its header declares."""
    if extension(path) != ".nii":
        return
    need = int(img.dataobj.offset) + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
    have = path.stat().st_size
    if have < need:
        raise InputError(f"{path}: file is truncated ({have} bytes, its header declares {need})")


def _read(
    path: PathLike,
    name: str | None,
    allow_channels: bool,
    labels: bool,
    dtype: torch.dtype | None,
) -> tuple[np.ndarray, Grid, str]:
    path = Path(path)
    _check_readable(path)
    name = str(path) if name is None else name
    if path.is_dir():
        sitk_img = _read_sitk_quietly(path)
    else:
        ext = _check_extension(path, IMAGE_EXTENSIONS, "image")
        check_stream_complete(path, "label map" if labels else "image")
        if ext in NIFTI_EXTENSIONS:
            arr, affine = _read_nifti_array(path, labels, dtype)
            data, grid = _spatial_and_channels(path, arr, affine, allow_channels)
            return data, grid, name
        sitk_img = _read_sitk_quietly(path)
        if ext in RASTER_EXTENSIONS and not labels:
            sitk_img = _luminance(sitk_img)
    img = from_sitk_image(sitk_img, name, allow_channels=allow_channels, path=path)
    return img.data.numpy(), img.grid, name


def read_image(
    path: PathLike,
    *,
    name: str | None = None,
    allow_channels: bool = False,
    dtype: torch.dtype | None = torch.float32,
) -> Image:
    """Read a 2D or 3D image as ``Image(data (C, *S), grid)`` in RAS world coordinates.

    Args:
        path: a NIfTI, NRRD, MetaImage, PNG/JPG/BMP/TIFF or DICOM file, or a folder holding a
            DICOM series (the largest series if there are several).
        name: the image's name in later messages (default: the path).
        allow_channels: read a last axis of channels (``(X, Y, Z, C)`` NIfTI, vector pixels)
            as ``C`` channels instead of refusing a 4D image.
        dtype: data type of the returned tensor (default float32, NIfTI scaling applied);
            ``None`` keeps the stored type. Use :func:`read_labels` for label maps.

    Raises:
        InputError: missing, empty, corrupt or unsupported file; 4D data; shear.
    """
    data, grid, name = _read(path, name, allow_channels, labels=False, dtype=dtype)
    if data.size == 0:
        raise InputError(f"{path}: image is empty (shape {data.shape})")
    return Image(_to_torch(data, dtype), grid, name)


def _label_dtype(lo: float, hi: float) -> np.dtype:
    for dt in (np.uint8, np.int16, np.int32, np.int64):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise ValueError


def read_labels(path: PathLike, *, name: str | None = None, allow_channels: bool = False) -> Image:
    """Read a label map with integer data (integer types kept; uint16/uint32 widened).

    Labels stored as floats must be integer-valued; they are cast to the smallest of
    uint8/int16/int32/int64 that holds them. Non-integer or non-finite values raise
    :class:`InputError`.
    """
    data, grid, name = _read(path, name, allow_channels, labels=True, dtype=None)
    data = label_array(path, data)
    check_looks_like_labels(path, data)
    return Image(_to_torch(data, None), grid, name)


def label_array(path: PathLike, data: np.ndarray) -> np.ndarray:
    """``data`` checked and cast as a label map (see :func:`read_labels`); ``path`` names it
    in errors."""
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise InputError(f"{path}: label map contains NaN or infinite values")
        frac = data != np.round(data)
        if frac.any():
            v = float(data[frac].flat[0])
            raise InputError(
                f"{path}: label map has non-integer values (e.g. {v:g}); is it an intensity image?"
            )
        lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
        try:
            data = data.astype(_label_dtype(lo, hi))
        except ValueError:
            raise InputError(f"{path}: label values [{lo:g}, {hi:g}] do not fit int64") from None
    elif data.dtype.kind == "b":
        data = data.astype(np.uint8)
    elif data.dtype.kind not in "iu":
        raise InputError(f"{path}: label map has unsupported data type {data.dtype}")
    elif data.dtype == np.uint64 and data.size and data.max() > np.iinfo(np.int64).max:
        raise InputError(f"{path}: label values do not fit int64")
    return data


# ---------------------------------------------------------------------------- writing
def _convert_dtype(
    path: Path, arr: np.ndarray, dtype: np.dtype | None, rescale: bool
) -> np.ndarray:
    if dtype is None:
        return arr
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if rescale:
            a = arr.astype(np.float64)
            lo, hi = float(a.min()), float(a.max())
            scale = (float(info.max) - float(info.min)) / (hi - lo) if hi > lo else 0.0
            return np.round((a - lo) * scale + info.min).astype(dtype)
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise InputError(f"{path}: cannot write NaN/infinite values as {dtype}")
            arr = np.round(arr)
        return np.clip(arr, info.min, info.max).astype(dtype)
    if rescale:
        raise InputError(f"{path}: rescale=True needs an integer dtype, got {dtype}")
    return arr.astype(dtype)


def _raster_dtype(path: Path, arr: np.ndarray, ext: str) -> np.ndarray:
    """Choose a lossless integer type for PNG/JPG/BMP, or refuse (no silent rescaling)."""
    if arr.dtype in (np.uint8,) or (arr.dtype == np.uint16 and ext in (".png", ".tif", ".tiff")):
        return arr
    if ext in (".tif", ".tiff") and arr.dtype in (np.float32, np.int16, np.int32):
        return arr
    finite = np.isfinite(arr).all() if arr.dtype.kind == "f" else True
    if finite and arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        integral = arr.dtype.kind in "iub" or bool(np.all(arr == np.round(arr)))
        if integral and lo >= 0 and hi <= 255:
            return arr.astype(np.uint8)
        if integral and lo >= 0 and hi <= 65535 and ext in (".png", ".tif", ".tiff"):
            return arr.astype(np.uint16)
        rng = f"[{lo:g}, {hi:g}]"
    else:
        rng = "with NaN/inf"
    raise InputError(
        f"{path}: {ext} stores 8-bit integers but the image has {arr.dtype} values {rng}; "
        "pass dtype='uint8' to round and clip, or rescale=True to stretch to 0..255"
    )


def write_image(
    image: Image,
    path: PathLike,
    dtype: np.dtype | str | torch.dtype | None = None,
    *,
    rescale: bool = False,
) -> Path:
    """Write ``image`` atomically; the format follows the extension.

    NIfTI is written with nibabel, ``sform`` and ``qform`` both set (code 1, scanner) from
    ``grid.affine``; a multi-channel image becomes ``(X, Y, Z, C)`` (``(X, Y, 1, C)`` in 2D),
    as :func:`read_image` with ``allow_channels=True`` reads it back. Other formats are written
    with SimpleITK in LPS (channels as vector pixels). PNG/JPG/BMP need 2D integer data in
    range: float data are refused unless integer-valued, or ``dtype='uint8'`` (round and clip)
    or ``rescale=True`` (stretch ``[min, max]`` to the full range of ``dtype``, default uint8)
    is passed. PNG/JPG/BMP do not store geometry.

    Args:
        dtype: stored data type (numpy/torch dtype or name); default keeps the tensor's type.

    Returns the path written. Raises :class:`InputError` for an unsupported extension, a
    missing or unwritable folder, or data the format cannot store.
    """
    path = Path(path)
    if not isinstance(image, Image):
        raise InputError(f"{path}: write_image expects an Image, got {type(image).__name__}")
    ext = _check_extension(path, WRITE_EXTENSIONS, "image")
    if isinstance(dtype, torch.dtype):
        dtype = torch.empty((), dtype=dtype).numpy().dtype
    np_dtype = np.dtype(dtype) if dtype is not None else None
    if rescale and np_dtype is None:
        np_dtype = np.dtype(np.uint8)
    arr = image.data.detach().cpu().numpy()
    if arr.size == 0:
        raise InputError(f"{path}: cannot write an empty image (shape {arr.shape})")
    arr = _convert_dtype(path, arr, np_dtype, rescale)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if ext in RASTER_EXTENSIONS:
        if image.ndim != 2:
            raise InputError(f"{path}: {ext} stores 2D images only; this image is {image.ndim}D")
        arr = _raster_dtype(path, arr, ext)
    if ext in NIFTI_EXTENSIONS:
        _write_nifti(path, arr, image.grid)
    else:
        import SimpleITK as sitk

        sitk_img = to_sitk_image(image.with_data(torch.from_numpy(np.ascontiguousarray(arr))))
        with atomic_write(path) as tmp:
            try:
                with keep_locale():
                    sitk.WriteImage(sitk_img, str(tmp))
            except RuntimeError as e:
                raise InputError(f"{path}: cannot write image ({_short(e)})") from None
    return path


def _write_nifti(path: Path, arr: np.ndarray, grid: Grid) -> None:
    import nibabel as nib

    c = arr.shape[0]
    if c == 1:
        data = arr[0]
    else:
        data = np.moveaxis(arr, 0, -1)
        if grid.ndim == 2:
            data = data[:, :, None, :]
    if grid.ndim == 2:
        aff = np.eye(4)
        aff[:2, :2] = grid.affine[:2, :2]
        aff[:2, 3] = grid.affine[:2, 2]
    else:
        aff = grid.affine
    store = None
    if data.dtype == np.int64:
        if (
            data.size
            and data.min() >= np.iinfo(np.int32).min
            and data.max() <= np.iinfo(np.int32).max
        ):
            data = data.astype(np.int32)
        else:
            store = np.int64
    elif data.dtype == np.uint64:
        store = np.uint64
    nii = nib.Nifti1Image(np.ascontiguousarray(data), aff, dtype=store)
    nii.set_sform(aff, code=1)
    nii.set_qform(aff, code=1)
    nii.header.set_xyzt_units("mm", "sec")
    with atomic_write(path) as tmp:
        try:
            nib.save(nii, str(tmp))
        except OSError as e:
            raise InputError(f"{path}: cannot write ({e.strerror or e})") from None
