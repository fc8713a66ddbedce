"""Point sets (landmarks) as CSV files with a header ``x,y[,z]`` and optional extra columns.

Coordinates in memory are always RAS world millimetres, shape ``(P, D)``. On disk they are RAS
by default; ``space='LPS'`` reads/writes ITK/ANTs-style files (``antsApplyTransformsToPoints``
and ``ants.apply_transforms_to_points`` use LPS ``x,y,z,t``), flipping the sign of ``x`` and
``y``. Other columns (``t``, ``label``, ``index``, comments, ...) are returned as strings by
:func:`read_point_table` and written back unchanged by :func:`write_points`.

Points of the *fixed* image map to the moving image with the registration's transform
directly (``transform(points)``), as ANTs maps points with the same transform list it uses to
warp images; moving-space points need the inverse.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from learnreg.core.errors import InputError
from learnreg.core.options import check_option
from learnreg.io.images import atomic_write

__all__ = ["read_points", "read_point_table", "write_points"]

PathLike = str | os.PathLike
_AXES = ("x", "y", "z")
_SPACES = ("RAS", "LPS")


def _check_space(space: str, path) -> str:
    return check_option(f"{path}: space", str(space).upper(), _SPACES, InputError)


def _flip(points: np.ndarray) -> np.ndarray:
    out = points.copy()
    out[:, :2] *= -1.0
    return out


def read_csv_rows(path: PathLike, expected_columns: str) -> list[list[str]]:
    """Non-empty rows of a CSV file (header first); InputError naming the file otherwise."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot read CSV ({e})") from None
    if not rows:
        raise InputError(f"{path}: empty CSV, expected a header with columns {expected_columns}")
    return rows


def read_point_table(
    path: PathLike,
    space: str = "RAS",
    *,
    ndim: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """Read a CSV of points: ``(points (P, D) in RAS mm, {extra column: values as str})``.

    The header must name ``x`` and ``y`` (and ``z`` for 3D; case-insensitive). ``ndim``
    forces the dimensionality: 2 reads ``x,y`` and keeps a ``z`` column as an extra; 3 requires
    ``z``. Without it, a ``z`` column means 3D.
    """
    path = Path(path)
    space = _check_space(space, path)
    if ndim not in (None, 2, 3):
        raise InputError(f"{path}: ndim must be 2 or 3, got {ndim}")
    if not path.is_file():
        raise InputError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    rows = read_csv_rows(path, "x,y[,z]")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    for a in _AXES:
        if lower.count(a) > 1:
            raise InputError(f"{path}: column {a!r} appears more than once in the header")
    d = ndim if ndim is not None else (3 if "z" in lower else 2)
    missing = [a for a in _AXES[:d] if a not in lower]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)} for {d}D points; header is "
            f"{','.join(header)!r}, expected x,y{',z' if d == 3 else ''}"
        )
    cols = [lower.index(a) for a in _AXES[:d]]
    if len(rows) < 2:
        raise InputError(f"{path}: the table has a header but no points")
    extra_idx = [i for i in range(len(header)) if i not in cols]
    values = np.empty((len(rows) - 1, d), dtype=np.float64)
    extra: dict[str, list[str]] = {header[i]: [] for i in extra_idx}
    for n, row in enumerate(rows[1:]):
        line = n + 2
        if len(row) != len(header):
            raise InputError(
                f"{path}: line {line} has {len(row)} fields, the header has {len(header)}"
            )
        for k, c in enumerate(cols):
            try:
                v = float(row[c])
            except ValueError:
                raise InputError(
                    f"{path}: line {line}: column {_AXES[k]!r} value {row[c].strip()!r} is not a number"
                ) from None
            if not math.isfinite(v):
                raise InputError(f"{path}: line {line}: column {_AXES[k]!r} is {row[c].strip()}")
            values[n, k] = v
        for i in extra_idx:
            extra[header[i]].append(row[i].strip())
    if space == "LPS":
        values = _flip(values)
    return torch.from_numpy(values).to(dtype), extra


def read_points(
    path: PathLike,
    space: str = "RAS",
    *,
    ndim: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Read the points of a CSV (header ``x,y[,z]``) as ``(P, D)`` RAS mm; see
    :func:`read_point_table` for the extra columns."""
    return read_point_table(path, space, ndim=ndim, dtype=dtype)[0]


def write_points(
    path: PathLike,
    points: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    space: str = "RAS",
    *,
    extra: Mapping[str, Sequence] | None = None,
) -> Path:
    """Write ``points (P, D)`` (RAS mm) as CSV ``x,y[,z]`` plus ``extra`` columns, atomically.

    ``space='LPS'`` writes ITK/ANTs coordinates; for ``antsApplyTransformsToPoints`` pass a
    ``t`` column too (e.g. ``extra={"t": [0] * P}``).
    """
    path = Path(path)
    space = _check_space(space, path)
    if isinstance(points, torch.Tensor):
        pts = points.detach().cpu().double().numpy()
    else:
        try:
            pts = np.asarray(points, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{path}: points must be numeric, shape (P, 2) or (P, 3)") from None
    if pts.ndim != 2 or pts.shape[1] not in (2, 3):
        raise InputError(f"{path}: points must have shape (P, 2) or (P, 3), got {pts.shape}")
    if not np.isfinite(pts).all():
        raise InputError(f"{path}: points contain NaN or infinite values")
    d = pts.shape[1]
    extra = dict(extra or {})
    for k, v in extra.items():
        if str(k).strip().lower() in _AXES[:d]:
            raise InputError(f"{path}: extra column {k!r} clashes with a coordinate column")
        if len(v) != len(pts):
            raise InputError(
                f"{path}: extra column {k!r} has {len(v)} values for {len(pts)} points"
            )
    if space == "LPS":
        pts = _flip(pts)
    header = list(_AXES[:d]) + [str(k) for k in extra]
    columns = list(extra.values())
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for i, p in enumerate(pts):
                w.writerow([repr(float(c)) for c in p] + [_fmt(col[i]) for col in columns])
    return path


def _fmt(v) -> str:
    if isinstance(v, float | np.floating):
        return repr(float(v))
    if isinstance(v, torch.Tensor):
        return _fmt(v.item())
    return str(v)
