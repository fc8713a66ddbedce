"""Checks every file passes when it is read, once, before anything uses it.

* **complete data**: a gzip stream (``.nii.gz``, ``.gz``) is decompressed to its end and its
  CRC-32 and length checked (SimpleITK silently zero-fills a truncated stream; nibabel stops
  reading where the header says the data ends and never reaches the checksum);
* **memory**: a header's declared size is compared with the memory available before the
  data is allocated;
* **geometry**: finite, invertible index-to-world matrices; images to register have at
  least a few voxels along every axis of their declared dimensionality (:func:`check_axes`,
  called by the registration's pair check: a single oblique slice is a fine image to warp);
* **label maps** look like one (integer, piecewise constant; not an intensity image).
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import numpy as np

from learnreg.core.errors import InputError

__all__ = [
    "check_stream_complete",
    "check_fits_in_memory",
    "check_index_to_world",
    "check_axes",
    "check_looks_like_labels",
    "available_memory",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def check_stream_complete(path: Path, what: str = "file") -> None:
    """Raise :class:`InputError` unless the gzip stream of ``path`` (when it is one) is whole:
    every member decompresses to its end and matches its CRC-32 and length."""
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            return
        fh.seek(0)
        try:
            _read_gzip_members(fh)
        except (zlib.error, EOFError, ValueError) as e:
            raise InputError(
                f"{path}: {what} is incomplete or corrupt ({e}): truncated or damaged, e.g. by "
                "an interrupted copy or download"
            ) from None


def _read_gzip_members(fh) -> None:
    """Decompress every gzip member of ``fh`` (output discarded, 64 MiB at a time); zlib
    checks each member's CRC-32 and length."""
    raw = fh.read(_CHUNK)
    while raw:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while not d.eof:
            if not raw:
                raise EOFError("the compressed stream ends before its end marker")
            d.decompress(raw, 64 * _CHUNK)
            raw = d.unconsumed_tail or (b"" if d.eof else fh.read(_CHUNK))
        raw = (d.unused_data or fh.read(_CHUNK)).lstrip(b"\x00")  # zero padding may follow
        if raw and raw[:2] != b"\x1f\x8b":
            raise ValueError("unexpected bytes after the compressed stream")


def available_memory() -> int | None:
    """Bytes of memory available to this process (Linux ``MemAvailable``; None elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def check_fits_in_memory(path: Path, shape: tuple[int, ...], bytes_per_voxel: int) -> None:
    """Raise :class:`InputError` when an image of ``shape`` would not fit in memory (its
    data, and the few float32 copies registration makes of it)."""
    voxels = int(np.prod([int(s) for s in shape], dtype=object))
    need = voxels * max(int(bytes_per_voxel), 4) * 4
    have = available_memory()
    if have is not None and need > have:
        dims = "×".join(str(int(s)) for s in shape)
        raise InputError(
            f"{path}: header declares {dims} voxels ({need / 2**30:.1f} GiB to register), more "
            f"than the {have / 2**30:.1f} GiB of memory available; is the header corrupt?"
        )


def check_index_to_world(path: Path | str, affine: np.ndarray) -> None:
    """Raise :class:`InputError` unless the homogeneous index-to-world matrix is finite and
    invertible."""
    a = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(a).all():
        raise InputError(f"{path}: the index-to-world matrix (affine) holds NaN or infinity")
    d = a.shape[0] - 1
    lin = a[:d, :d]
    scale = np.abs(lin).max() if lin.size else 0.0
    if scale == 0 or abs(np.linalg.det(lin / scale)) < 1e-6:
        raise InputError(
            f"{path}: the index-to-world matrix (affine) is singular: the voxel axes do not "
            "span space"
        )


def check_axes(path: Path | str, shape: tuple[int, ...], minimum: int = 2) -> None:
    """Raise :class:`InputError` when an axis has fewer than ``minimum`` voxels: an image of
    that size is degenerate for its declared dimensionality."""
    if any(int(s) < minimum for s in shape):
        dims = "×".join(str(int(s)) for s in shape)
        raise InputError(
            f"{path}: a {len(shape)}D image of {dims} voxels has an axis of fewer than "
            f"{minimum} voxels; give a {len(shape)}D image with at least {minimum} voxels "
            "along every axis"
        )


_MAX_LABELS = 5000


def check_looks_like_labels(path: Path | str, data: np.ndarray) -> None:
    """Raise :class:`InputError` when integer ``data`` look like an intensity image rather than
    a label map: more than 5000 distinct values, or more than 255 of them with neighbours
    that mostly differ (label maps are piecewise constant)."""
    if data.size == 0:
        return
    lo, hi = int(data.min()), int(data.max())
    if hi - lo < 256:
        return
    if hi - lo < 50_000_000:
        distinct = int(np.count_nonzero(np.bincount((data.ravel() - lo).astype(np.int64))))
    else:
        distinct = len(np.unique(data))
    if distinct <= 255:
        return
    flat = data.reshape(data.shape[0], -1) if data.ndim > 1 else data[None]
    inside = (flat[:, 1:] != 0) | (flat[:, :-1] != 0)
    same = (flat[:, 1:] == flat[:, :-1])[inside]
    piecewise = float(same.mean()) if same.size else 1.0
    if distinct > _MAX_LABELS or piecewise < 0.5:
        raise InputError(
            f"{path}: does not look like a label map ({distinct} distinct values, neighbours "
            f"equal in {piecewise:.0%} of the foreground); is it an intensity image?"
        )
