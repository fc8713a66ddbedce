"""Images given as Python objects rather than files: paths, nibabel, SimpleITK and ANTsPy
images, and numpy arrays with an affine — what the Python API accepts and gives back.

Geometry is carried across exactly: nibabel affines are RAS+ like ours; SimpleITK and ANTsPy
images are LPS and go through :func:`~learnreg.io.images.from_sitk_image` (ANTsPy arrays are in
index order ``(i, j, k)``, as ours).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from learnreg.core.errors import InputError
from learnreg.core.image import Image
from learnreg.io.images import (
    from_sitk_image,
    image_from_array,
    label_array,
    read_image,
    read_labels,
    to_sitk_image,
)

__all__ = ["ImageLike", "as_image", "like"]

ImageLike = Any
"""A path, an :class:`~learnreg.core.Image`, a nibabel image, a SimpleITK image, an ANTsPy
image, or ``(array, affine)`` with a RAS+ mm affine as nibabel's."""


def _kind(obj: Any) -> str:
    if isinstance(obj, str | os.PathLike):
        return "path"
    if isinstance(obj, Image):
        return "image"
    if isinstance(obj, tuple) and len(obj) == 2:
        return "array"
    module = type(obj).__module__.split(".")[0]
    if module == "SimpleITK":
        return "sitk"
    if module == "ants" or type(obj).__name__ == "ANTsImage":
        return "ants"
    if hasattr(obj, "affine") and hasattr(obj, "dataobj"):
        return "nibabel"
    if isinstance(obj, np.ndarray | torch.Tensor):
        raise InputError(
            "an array alone has no place in physical space: pass (array, affine) with its "
            "4x4 RAS+ affine (nibabel's img.affine), or a nibabel/SimpleITK image"
        )
    raise InputError(
        f"cannot read an image from a {type(obj).__name__}: expected a path, a nibabel, "
        "SimpleITK or ANTsPy image, or (array, affine)"
    )


def _ants_to_sitk(img: Any):
    import SimpleITK as sitk

    arr = np.asarray(img.numpy())
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr.T), isVector=False)
    out.SetSpacing(tuple(float(s) for s in img.spacing))
    out.SetOrigin(tuple(float(o) for o in img.origin))
    out.SetDirection(tuple(float(d) for d in np.asarray(img.direction).ravel()))
    return out


def as_image(obj: ImageLike, *, name: str | None = None, labels: bool = False) -> Image:
    """``obj`` as an :class:`Image`; label maps are checked and cast as by
    :func:`~learnreg.io.images.read_labels` when ``labels``.

    Raises :class:`InputError` naming ``name`` (or the file) for anything that is not an image
    in physical space (a bare array, 4D data, a non-integer label map, ...)."""
    kind = _kind(obj)
    if kind == "path":
        return read_labels(obj, name=name) if labels else read_image(obj, name=name)
    where = name or f"<{kind} image>"
    if kind == "image":
        img = obj if name is None else Image(obj.data, obj.grid, name)
    elif kind == "array":
        array, affine = obj
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        img = image_from_array(np.asarray(array), affine, where)
    elif kind == "nibabel":
        img = image_from_array(np.asanyarray(obj.dataobj), obj.affine, where)
    else:
        img = from_sitk_image(_ants_to_sitk(obj) if kind == "ants" else obj, where)
    data = img.data.numpy()
    if labels:
        return Image(torch.from_numpy(label_array(where, data)), img.grid, img.name)
    return Image(torch.from_numpy(np.asarray(data, dtype=np.float32)), img.grid, img.name)


def like(template: ImageLike, image: Image) -> Any:
    """``image`` in the kind of object ``template`` is: a nibabel image for a nibabel image,
    SimpleITK for SimpleITK, ANTsPy for ANTsPy, ``(array, affine)`` for a tuple, else the
    :class:`Image` itself (for paths and Images)."""
    kind = _kind(template)
    if kind in ("path", "image"):
        return image
    arr = image.data.detach().cpu().numpy()
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    affine = image.grid.affine
    if kind == "array":
        return arr, affine
    if kind == "nibabel":
        import nibabel as nib

        if image.ndim == 2:
            a4 = np.eye(4)
            a4[np.ix_([0, 1, 3], [0, 1, 3])] = affine
            affine = a4
            if image.channels > 1:  # (X, Y, 1, C), as learnreg writes a 2D multichannel NIfTI
                arr = arr[:, :, None]
        return nib.Nifti1Image(arr, affine)
    sitk_img = to_sitk_image(image)
    if kind == "sitk":
        return sitk_img
    import ants

    return ants.from_numpy(
        arr,
        origin=list(sitk_img.GetOrigin()),
        spacing=list(sitk_img.GetSpacing()),
        direction=np.asarray(sitk_img.GetDirection()).reshape(image.ndim, image.ndim),
    )
