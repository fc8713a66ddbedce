"""Save and load a registration result as a folder of ITK/ANTs-compatible files.

Layout of a result folder::

    affine.mat            fixed→moving affine (ITK, LPS), the ANTs ``0GenericAffine.mat``
    affine_inverse.mat    its inverse
    warp.nii.gz           displacement (LPS mm), ANTs ``1Warp.nii.gz``
    inverse_warp.nii.gz   its inverse, ANTs ``1InverseWarp.nii.gz``
    result.json           grids, file roles and the order to apply them

The warps are written on the grid they were computed on (``warp_grid="native"``: a velocity's
integration grid, a network's grid — 1 MB instead of 44 MB for a 1 mm brain), which ITK and
ANTs interpolate linearly exactly as learnreg does, or on the fixed image's grid
(``warp_grid="fixed"``, as ANTs writes them).

Replay with ANTs: ``antsApplyTransforms -r fixed -i moving -t warp.nii.gz -t affine.mat``;
the other way: ``-r moving -i fixed -t affine_inverse.mat -t inverse_warp.nii.gz``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from learnreg import __version__
from learnreg.core.errors import InputError
from learnreg.core.files import atomic_write
from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.io.foreign import FOREIGN_FORMATS, write_foreign_affine
from learnreg.io.transforms import (
    read_affine,
    read_displacement,
    write_affine,
    write_displacement,
    write_transform,
)
from learnreg.spatial.result import RegistrationResult

__all__ = [
    "save_result",
    "load_result",
    "write_json",
    "replay_commands",
    "ants_apply_arguments",
    "FORMATS",
    "WARP_GRIDS",
]

log = logging.getLogger(__name__)

FILES = {
    "affine": "affine.mat",
    "affine_inverse": "affine_inverse.mat",
    "warp": "warp.nii.gz",
    "inverse_warp": "inverse_warp.nii.gz",
    "composite": "transform.h5",
    "composite_inverse": "inverse_transform.h5",
}
FORMATS = ("ants", "h5", "fsl", "lta")
"""Transform file sets: ``ants`` (affine ``.mat`` + displacement NIfTI, always written: it is
what :func:`load_result` reads), ``h5`` (one ITK composite ``.h5`` per direction, as
niprep-style pipelines pass transforms), ``fsl`` (FLIRT ``affine_flirt.mat``) and ``lta``
(FreeSurfer ``affine.lta``) — those two hold the affine part only (3D; through
nitransforms, :mod:`learnreg.io.foreign`)."""


def write_json(path: str | Path, obj: dict) -> None:
    """Write JSON atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float), encoding="utf-8")


WARP_GRIDS = ("native", "fixed")
"""Where warps are written: on the grid they were computed on, or on the fixed image's."""


def save_result(
    result: RegistrationResult,
    folder: str | Path,
    formats: Sequence[str] = ("ants",),
    warp_grid: str = "native",
) -> dict[str, str]:
    """Write the transform files (of :data:`FORMATS` ``formats``; ``ants`` always) and
    ``result.json`` into ``folder``; returns role → file. ``warp_grid``: :data:`WARP_GRIDS`
    (``native`` falls back to the fixed grid for fields that have no coarser grid)."""
    check_option("warp_grid", warp_grid, WARP_GRIDS)
    folder = Path(folder)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown transform formats {sorted(unknown)}; expected {FORMATS}")
    files: dict[str, str] = {}
    if result.deformable is not None and {"fsl", "lta"} & set(formats):
        log.warning(
            "FSL and LTA files hold the affine part only; the deformable part is in "
            "warp.nii.gz (and transform.h5 with --output-format h5)"
        )
    for fmt in ("fsl", "lta"):
        if fmt in formats:
            name = FOREIGN_FORMATS[fmt][1]
            write_foreign_affine(
                folder / name, result.linear(), result.fixed_grid, result.moving_grid, fmt
            )
            files[f"affine_{fmt}"] = name
    if "h5" in formats:
        write_transform(folder / FILES["composite"], result.transform(), grid=result.fixed_grid)
        files["composite"] = FILES["composite"]
        if result.deformable is None or result.inverse_deformable is not None:
            inverse = result.inverse_transform()
            write_transform(folder / FILES["composite_inverse"], inverse, grid=result.moving_grid)
            files["composite_inverse"] = FILES["composite_inverse"]
    if result.affine is not None:
        write_affine(folder / FILES["affine"], result.affine)
        write_affine(folder / FILES["affine_inverse"], result.affine.inverse())
        files["affine"], files["affine_inverse"] = FILES["affine"], FILES["affine_inverse"]
    native = warp_grid == "native"
    for role, on_fixed, coarse in (
        ("warp", result.deformable, result.native_deformable),
        ("inverse_warp", result.inverse_deformable, result.native_inverse),
    ):
        if on_fixed is not None:
            write_displacement(folder / FILES[role], coarse if native and coarse else on_fixed)
            files[role] = FILES[role]
    forward = [files[k] for k in ("warp", "affine") if k in files]
    inverse = [files[k] for k in ("affine_inverse", "inverse_warp") if k in files]
    d = result.ndim
    manifest = {
        "learnreg_version": __version__,
        "convention": "points: fixed→moving, x_moving = affine(x + warp(x)); files in ITK/ANTs LPS",
        "fixed_grid": result.fixed_grid.to_dict(),
        "moving_grid": result.moving_grid.to_dict(),
        "files": files,
        "ants_forward_transforms": forward,
        "ants_inverse_transforms": inverse,
        "replay": replay_commands(forward, inverse, d),
        "info": result.info,
    }
    write_json(folder / "result.json", manifest)
    return files


def replay_commands(forward: list[str], inverse: list[str], ndim: int) -> dict[str, dict[str, str]]:
    """The exact calls that replay a result folder's files in ANTs, ANTsPy and SimpleITK, in
    both directions (``forward``: moving image onto the fixed grid; ``inverse``: fixed image
    onto the moving grid). Every inverse file is already inverted, so nothing may be inverted
    again: ANTsPy needs ``whichtoinvert`` all False explicitly (given a ``.mat`` followed by a
    field, its default inverts the ``.mat``), SimpleITK reads each file as it is."""

    def sitk(files: list[str]) -> str:
        parts = [
            f"sitk.DisplacementFieldTransform(sitk.ReadImage('{f}', sitk.sitkVectorFloat64))"
            if f.endswith(".nii.gz")
            else f"sitk.ReadTransform('{f}')"
            for f in reversed(files)  # SimpleITK applies the last added first
        ]
        return f"sitk.CompositeTransform([{', '.join(parts)}])"

    out = {}
    for name, files, ref, inp in (
        ("forward", forward, "fixed", "moving"),
        ("inverse", inverse, "moving", "fixed"),
    ):
        ts = " ".join(f"-t {f}" for f in files)
        out[name] = {
            "antsApplyTransforms": f"antsApplyTransforms -d {ndim} -r {ref}.nii.gz "
            f"-i {inp}.nii.gz {ts} -o out.nii.gz",
            "ants.apply_transforms": f"ants.apply_transforms(fixed={ref}, moving={inp}, "
            f"transformlist={files!r}, whichtoinvert={[False] * len(files)!r})",
            "SimpleITK": f"sitk.Resample({inp}, {ref}, {sitk(files)}, sitk.sitkLinear, 0.0)",
        }
    return out


def ants_apply_arguments(folder: str | Path, inverse: bool = False) -> dict[str, list]:
    """``transformlist`` and ``whichtoinvert`` for ``ants.apply_transforms`` that replay the
    result folder ``folder`` (``inverse``: fixed-space data onto the moving grid)."""
    folder = Path(folder)
    manifest_path = folder / "result.json"
    try:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        names = m["ants_inverse_transforms" if inverse else "ants_forward_transforms"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{manifest_path}: unreadable result manifest ({e})") from None
    files = [str((folder / n).resolve()) for n in names]
    return {"transformlist": files, "whichtoinvert": [False] * len(files)}


def load_result(folder: str | Path) -> RegistrationResult:
    """Load a result folder written by :func:`save_result`."""
    folder = Path(folder)
    manifest_path = folder / "result.json"
    if not manifest_path.is_file():
        raise InputError(f"{folder}: not a learnreg result folder (no result.json)")
    try:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = m["files"]
        fixed, moving = Grid.from_dict(m["fixed_grid"]), Grid.from_dict(m["moving_grid"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{manifest_path}: unreadable result manifest ({e})") from None
    affine = read_affine(folder / files["affine"]) if "affine" in files else None
    fwd = read_displacement(folder / files["warp"]) if "warp" in files else None
    inv = read_displacement(folder / files["inverse_warp"]) if "inverse_warp" in files else None
    if fwd is None:
        return RegistrationResult(fixed, moving, affine, None, inv, m.get("info", {}))
    return RegistrationResult.from_native(fixed, moving, affine, fwd, inv, m.get("info", {}))
