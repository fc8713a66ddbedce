"""Bad files made from good ones: each ``FAULTS[name](good, folder)`` writes a faulty copy of
the image ``good`` into ``folder`` and returns its path and a word its error must contain."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np


def _load(good: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(good))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine.copy()


def _save(folder: Path, name: str, data, affine, dtype=np.float32) -> Path:
    path = folder / name
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), str(path))
    return path


def missing(good: Path, folder: Path):
    return folder / "absent.nii.gz", "file not found"


def empty_file(good: Path, folder: Path):
    (folder / "empty.nii.gz").write_bytes(b"")
    return folder / "empty.nii.gz", "empty"


def text_as_nifti(good: Path, folder: Path):
    (folder / "notes.nii.gz").write_text("not an image\n")
    return folder / "notes.nii.gz", "cannot read"


def truncated_gzip(good: Path, folder: Path):
    raw = good.read_bytes()
    (folder / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    return folder / "cut.nii.gz", "incomplete or corrupt"


def last_bytes_lost(good: Path, folder: Path):
    raw = good.read_bytes()
    (folder / "tail.nii.gz").write_bytes(raw[:-6])
    return folder / "tail.nii.gz", "incomplete or corrupt"


def flipped_byte(good: Path, folder: Path):
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (folder / "flip.nii.gz").write_bytes(bytes(raw))
    return folder / "flip.nii.gz", "corrupt"


def truncated_plain_nifti(good: Path, folder: Path):
    raw = gzip.decompress(good.read_bytes())
    (folder / "cut.nii").write_bytes(raw[: len(raw) * 2 // 3])
    return folder / "cut.nii", "truncated"


def unknown_extension(good: Path, folder: Path):
    shutil.copy(good, folder / "image.xyz")
    return folder / "image.xyz", "unsupported image extension"


def folder_without_dicom(good: Path, folder: Path):
    (folder / "series").mkdir()
    (folder / "series" / "readme.txt").write_text("x")
    return folder / "series", "no DICOM series"


def four_d(good: Path, folder: Path):
    data, aff = _load(good)
    return _save(folder, "four.nii.gz", np.stack([data, data], -1), aff), "4D image"


def one_d(good: Path, folder: Path):
    data, aff = _load(good)
    return _save(folder, "line.nii.gz", data.ravel()[:50], aff), "1D image"


def nan_voxels(good: Path, folder: Path):
    data, aff = _load(good)
    data.flat[:: max(1, data.size // 7)] = np.nan
    return _save(folder, "nan.nii.gz", data, aff), "NaN"


def inf_voxel(good: Path, folder: Path):
    data, aff = _load(good)
    data.flat[data.size // 2] = np.inf
    return _save(folder, "inf.nii.gz", data, aff), "infinite"


def constant(good: Path, folder: Path):
    data, aff = _load(good)
    return _save(folder, "flat.nii.gz", np.full_like(data, 3.0), aff), "constant"


def all_zero(good: Path, folder: Path):
    data, aff = _load(good)
    return _save(folder, "zero.nii.gz", np.zeros_like(data), aff), "constant"


def nan_translation(good: Path, folder: Path):
    data, aff = _load(good)
    aff[0, 3] = np.nan
    return _save(folder, "nanpos.nii.gz", data, aff), "NaN or infinity"


def singular_affine(good: Path, folder: Path):
    data, aff = _load(good)
    aff[:3, 1] = aff[:3, 0]  # two voxel axes along one direction
    return _save(folder, "flatspace.nii.gz", data, aff), "singular"


def sheared(good: Path, folder: Path):
    data, aff = _load(good)
    aff[0, 1] = 0.5 * abs(aff[1, 1])
    return _save(folder, "shear.nii.gz", data, aff), "shear"


def huge_header(good: Path, folder: Path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    img.header.set_data_shape((30000, 30000, 30000))
    path = folder / "huge.nii"
    with open(path, "wb") as fh:
        img.header.write_to(fh)
        fh.write(b"\0" * 4096)
    return path, "memory"


def one_voxel_thick(good: Path, folder: Path):
    data, aff = _load(good)
    return _save(folder, "thin.nii.gz", data[:1], aff), "fewer than 4 voxels"


def two_voxels_thick(good: Path, folder: Path):
    data, aff = _load(good)
    return _save(folder, "thin2.nii.gz", data[:, :2], aff), "fewer than 4 voxels"


def complex_data(good: Path, folder: Path):
    data, aff = _load(good)
    return _save(folder, "complex.nii.gz", data.astype(np.complex64), aff, np.complex64), "RGB"


def _truncated_sitk(good: Path, folder: Path, name: str, compress: bool) -> Path:
    import SimpleITK as sitk

    path = folder / name
    sitk.WriteImage(sitk.ReadImage(str(good)), str(path), compress)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    return path


def truncated_metaimage(good: Path, folder: Path):
    return _truncated_sitk(good, folder, "cut.mha", False), "data not read completely"


def truncated_compressed_nrrd(good: Path, folder: Path):
    return _truncated_sitk(good, folder, "cut.nrrd", True), "cannot read image"


def markup_in_name(good: Path, folder: Path):
    return folder / "[red]scan[/x].nii.gz", "[red]scan[/x].nii.gz"


FAULTS: dict[str, Callable[[Path, Path], tuple[Path, str]]] = {
    f.__name__: f
    for f in (
        missing,
        empty_file,
        text_as_nifti,
        truncated_gzip,
        last_bytes_lost,
        flipped_byte,
        truncated_plain_nifti,
        unknown_extension,
        folder_without_dicom,
        four_d,
        one_d,
        nan_voxels,
        inf_voxel,
        constant,
        all_zero,
        nan_translation,
        singular_affine,
        sheared,
        huge_header,
        one_voxel_thick,
        two_voxels_thick,
        complex_data,
        truncated_metaimage,
        truncated_compressed_nrrd,
        markup_in_name,
    )
}
