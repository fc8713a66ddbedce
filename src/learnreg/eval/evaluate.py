"""Evaluate registration methods on lists of image pairs: the same metrics for every method.

A *method* is anything with ``.name`` and ``.register(fixed, moving, pair=None) ->
RegistrationResult``; specs name them on the command line:

- ``classical:PRESET``: :func:`learnreg.optimize.classical.register` with that preset;
- ``transforms:DIR``: precomputed transforms in ``DIR/<pair name>/``, either a learnreg result
  folder (``result.json``) or ANTs outputs (``*0GenericAffine.mat``, ``*1Warp.nii.gz``, optional
  ``*1InverseWarp.nii.gz``), read with learnreg's ITK/ANTs readers;
- ``ants:TYPE``: ``ants.registration(type_of_transform=TYPE)`` (antspyx), read back through the
  files ANTs writes, exactly as ``transforms:`` would.

``LABEL=SPEC`` names a method ``LABEL`` in the tables. New kinds (learned models) plug in with
:func:`register_method`.

Whatever produced the transform, every number comes from the resulting
:class:`~learnreg.spatial.result.RegistrationResult` (fixed→moving points, ``x_moving =
A(x + u(x))``): moving labels are warped label-safe (``mode="label"``) onto the fixed grid; Dice
and HD95 (mm, fixed spacing) over the fixed map's labels; TRE maps the fixed landmarks into
moving space and compares them with the moving landmarks; Jacobian statistics and inverse
consistency use the deformable part on the fixed grid. Wall time is the registration call only.
Peak memory (``ru_maxrss`` right after registration, image loading included) is reported only
with ``isolate=True``, where every (method, pair) runs in its own process; within one long-lived
process the number would be the maximum over everything run before.

Records (one JSON per method and pair, ``outdir/records/<method>/<pair>.json``) follow the
schema of :func:`empty_record`; a pair that fails is recorded with ``error`` set and never stops
the others.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from learnreg.core.errors import InputError
from learnreg.core.image import Image
from learnreg.io.points import read_csv_rows
from learnreg.io.result import write_json
from learnreg.spatial.result import RegistrationResult

__all__ = [
    "Pair",
    "Method",
    "pairs_from_csv",
    "atlas_pairs",
    "register_method",
    "resolve_method",
    "method_kinds",
    "slug",
    "empty_record",
    "evaluate_pair",
    "evaluate",
    "record_path",
]

PathLike = str | os.PathLike
RECORD_KEYS = (
    "method", "pair", "fixed", "moving",
    "dice_mean", "dice", "hd95_mean", "hd95", "tre_mean", "tre_max",
    "folding_fraction", "folding_count", "sdlogj", "ice_mean",
    "seconds", "peak_memory_mb", "error", "qc_png",
)  # fmt: skip


# ---------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class Pair:
    """One registration task: paths of the images and, optionally, labels and landmarks.

    ``fixed_points`` / ``moving_points`` are CSVs (``x,y[,z]``, RAS mm) of corresponding
    landmarks, row ``i`` of one matching row ``i`` of the other.
    """

    name: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_points: Path | None = None
    moving_points: Path | None = None

    def to_dict(self) -> dict:
        return {k: (None if v is None else str(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Pair:
        return cls(
            name=d["name"],
            **{k: (None if d.get(k) is None else Path(d[k])) for k in _PATH_FIELDS},
        )


_PATH_FIELDS = (
    "fixed", "moving", "fixed_labels", "moving_labels", "fixed_points", "moving_points"
)  # fmt: skip


def _stem(path: PathLike) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-") or "pair"


def pairs_from_csv(path: PathLike) -> list[Pair]:
    """Read pairs from a CSV with columns ``fixed,moving`` and optionally ``fixed_labels,
    moving_labels,fixed_points,moving_points,name``; relative paths are relative to the CSV.

    Empty cells mean "not given". Names default to ``<moving>_to_<fixed>`` and must be unique.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: pairs CSV not found")
    rows = read_csv_rows(path, "fixed,moving")
    header = [h.strip().lower() for h in rows[0]]
    known = set(_PATH_FIELDS) | {"name"}
    unknown = [h for h in header if h not in known]
    if unknown:
        raise InputError(
            f"{path}: unknown column(s) {', '.join(unknown)}; expected fixed,moving and "
            f"optionally {','.join(_PATH_FIELDS[2:])},name"
        )
    missing = [c for c in ("fixed", "moving") if c not in header]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}; header is {','.join(header)!r}"
        )
    if len(rows) < 2:
        raise InputError(f"{path}: no pairs (only a header)")
    base = path.parent
    pairs: list[Pair] = []
    seen: dict[str, int] = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InputError(f"{path}: row {n} has {len(row)} fields, the header has {len(header)}")
        cells = {h: c.strip() for h, c in zip(header, row, strict=True)}
        for col in ("fixed", "moving"):
            if not cells[col]:
                raise InputError(f"{path}: row {n}: column {col!r} is empty")
        for a, b in (("fixed_labels", "moving_labels"), ("fixed_points", "moving_points")):
            if bool(cells.get(a)) != bool(cells.get(b)):
                given, other = (a, b) if cells.get(a) else (b, a)
                raise InputError(f"{path}: row {n}: column {given!r} is set but {other!r} is not")
        paths = {
            k: (base / cells[k] if not Path(cells[k]).is_absolute() else Path(cells[k]))
            for k in _PATH_FIELDS
            if cells.get(k)
        }
        name = _safe_name(
            cells.get("name") or f"{_stem(paths['moving'])}_to_{_stem(paths['fixed'])}"
        )
        if name in seen:
            raise InputError(
                f"{path}: row {n}: pair name {name!r} repeats row {seen[name]}; add a name column"
            )
        seen[name] = n
        pairs.append(Pair(name=name, **paths))
    return pairs


def atlas_pairs(
    atlas: PathLike,
    atlas_labels: PathLike | None,
    folder: PathLike,
    labels_folder: PathLike | None = None,
    pattern: str = "*.nii.gz",
) -> list[Pair]:
    """Atlas-to-subject pairs: fixed ``atlas``, moving every image in ``folder`` matching
    ``pattern`` (the atlas itself excluded); labels from ``labels_folder`` by file name.

    A subject without a label file gets a pair whose ``moving_labels`` does not exist, so that
    pair is reported as an error rather than silently scored without labels.
    """
    atlas, folder = Path(atlas), Path(folder)
    if not atlas.exists():
        raise InputError(f"{atlas}: atlas image not found")
    if not folder.is_dir():
        raise InputError(f"{folder}: moving-image folder not found")
    if labels_folder is not None and atlas_labels is None:
        raise InputError("--labels-dir needs --atlas-labels (the atlas's label map)")
    files = sorted(p for p in folder.glob(pattern) if p.resolve() != atlas.resolve())
    if not files:
        raise InputError(f"{folder}: no images matching {pattern!r}")
    pairs = []
    for f in files:
        lab = Path(labels_folder) / f.name if labels_folder is not None else None
        pairs.append(
            Pair(
                name=_safe_name(_stem(f)),
                fixed=atlas,
                moving=f,
                fixed_labels=Path(atlas_labels) if lab is not None else None,
                moving_labels=lab,
            )
        )
    return pairs


# ---------------------------------------------------------------------------- methods
@runtime_checkable
class Method(Protocol):
    """A registration method as the evaluation sees it."""

    name: str

    def register(
        self, fixed: Image, moving: Image, pair: Pair | None = None
    ) -> RegistrationResult: ...


_REGISTRY: dict[str, Callable[[str], Method]] = {}


def register_method(kind: str) -> Callable:
    """Decorator: ``@register_method("kind")`` on a factory ``(argument) -> Method`` makes
    ``kind:ARGUMENT`` a method spec."""

    def deco(factory: Callable[[str], Method]) -> Callable[[str], Method]:
        _REGISTRY[kind] = factory
        return factory

    return deco


def method_kinds() -> list[str]:
    return sorted(_REGISTRY)


def slug(name: str) -> str:
    """A file-system-safe folder name for a method name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-") or "method"


def resolve_method(spec: str | Method) -> Method:
    """A :class:`Method` from a spec ``[LABEL=]KIND:ARG`` (e.g. ``classical:affine``,
    ``transforms:out/ants``, ``syn=ants:SyN``); a Method passes through."""
    if not isinstance(spec, str):
        return spec
    label = None
    body = spec.strip()
    m = re.match(r"^([A-Za-z0-9_.+-]+)=(.+)$", body)
    if m:
        label, body = m.group(1), m.group(2)
    kind, sep, arg = body.partition(":")
    if not sep or not arg:
        raise InputError(
            f"--method {spec!r}: expected KIND:ARGUMENT with KIND one of {', '.join(method_kinds())}"
            " (e.g. classical:default, ants:SyN, transforms:DIR, model:NAME,refine=N)"
        )
    if kind not in _REGISTRY:
        raise InputError(
            f"--method {spec!r}: unknown kind {kind!r}; known: {', '.join(method_kinds())}"
        )
    method = _REGISTRY[kind](arg)
    if label:
        method.name = label
    return method


@dataclass
class ClassicalMethod:
    preset: str
    name: str = ""

    def __post_init__(self) -> None:
        from learnreg.optimize.config import preset

        try:
            preset(self.preset)
        except ValueError as e:
            raise InputError(f"--method classical:{self.preset}: {e}") from None
        self.name = self.name or f"classical:{self.preset}"

    def register(self, fixed: Image, moving: Image, pair: Pair | None = None):
        from learnreg.optimize.classical import register

        return register(fixed, moving, self.preset)


@dataclass
class TransformsMethod:
    """Precomputed transforms: ``folder/<pair name>/`` per pair."""

    folder: Path
    name: str = ""

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if not self.folder.is_dir():
            raise InputError(f"--method transforms:{self.folder}: folder not found")
        self.name = self.name or f"transforms:{self.folder.name}"

    def register(self, fixed: Image, moving: Image, pair: Pair | None = None):
        if pair is None:
            raise ValueError("transforms: methods need the pair (its name selects the folder)")
        sub = self.folder / pair.name
        if not sub.is_dir():
            raise InputError(f"{sub}: no transforms for pair {pair.name!r}")
        return read_result_folder(sub, fixed, moving)


def _one(folder: Path, pattern: str, required: bool) -> Path | None:
    found = sorted(folder.glob(pattern))
    if len(found) > 1:
        raise InputError(f"{folder}: several files match {pattern}: {[p.name for p in found]}")
    if not found and required:
        raise InputError(f"{folder}: no {pattern} (expected a learnreg result or ANTs outputs)")
    return found[0] if found else None


def read_result_folder(folder: PathLike, fixed: Image, moving: Image) -> RegistrationResult:
    """A learnreg result folder (``result.json``) or ANTs outputs (``*0GenericAffine.mat``,
    ``*1Warp.nii.gz``, ``*1InverseWarp.nii.gz``) as a :class:`RegistrationResult`."""
    from learnreg.io.result import load_result
    from learnreg.io.transforms import read_affine, read_displacement

    folder = Path(folder)
    if (folder / "result.json").is_file():
        result = load_result(folder)
    else:
        aff = _one(folder, "*0GenericAffine.mat", required=False)
        warp = _one(folder, "*1Warp.nii.gz", required=aff is None)
        inv = _one(folder, "*1InverseWarp.nii.gz", required=False)
        fwd = read_displacement(warp) if warp is not None else None
        bwd = read_displacement(inv) if inv is not None else None
        for f, p in ((fwd, warp), (bwd, inv)):
            if f is not None and not f.grid.allclose(fixed.grid, atol=1e-3):
                raise InputError(f"{p}: field grid differs from the fixed image {fixed.name}")
        result = RegistrationResult(
            fixed.grid,
            moving.grid,
            read_affine(aff) if aff is not None else None,
            fwd,
            bwd,
            {"source": str(folder)},
        )
    if not result.fixed_grid.allclose(fixed.grid, atol=1e-3):
        raise InputError(f"{folder}: result's fixed grid differs from the fixed image {fixed.name}")
    return result


@dataclass
class AntsMethod:
    """``ants.registration(type_of_transform=...)`` through antspyx; read back via its files."""

    type_of_transform: str
    name: str = ""

    def __post_init__(self) -> None:
        try:
            import ants  # noqa: F401
        except ImportError:
            raise InputError(
                f"--method ants:{self.type_of_transform}: antspyx is not installed "
                "(pip install antspyx)"
            ) from None
        self.name = self.name or f"ants:{self.type_of_transform}"

    def register(self, fixed: Image, moving: Image, pair: Pair | None = None):
        import ants

        from learnreg.io.images import write_image

        with tempfile.TemporaryDirectory(prefix="learnreg-ants-") as tmp:
            tmp = Path(tmp)
            write_image(fixed, tmp / "fixed.nii.gz", np.float32)
            write_image(moving, tmp / "moving.nii.gz", np.float32)
            f = ants.image_read(str(tmp / "fixed.nii.gz"))
            m = ants.image_read(str(tmp / "moving.nii.gz"))
            t0 = time.perf_counter()
            try:
                ants.registration(
                    f, m, type_of_transform=self.type_of_transform, outprefix=str(tmp / "reg_")
                )
            except (ValueError, RuntimeError) as e:
                raise InputError(f"ants:{self.type_of_transform}: {e}") from None
            seconds = time.perf_counter() - t0
            result = read_result_folder(tmp, fixed, moving)
        result.info.update(method=self.name, seconds=seconds)
        return result


@dataclass
class ModelMethod:
    """A trained network (shipped name, model folder or checkpoint), optionally refined:
    spec ``model:NAME[,refine=N]``."""

    model: str
    refine: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        from learnreg.zoo.models import load_model

        if self.refine < 0:
            raise InputError(f"--method model:{self.model}: refine must be >= 0")
        self._model = load_model(self.model)
        suffix = f",refine={self.refine}" if self.refine else ""
        self.name = self.name or f"model:{Path(self.model).name}{suffix}"

    def register(self, fixed: Image, moving: Image, pair: Pair | None = None):
        from learnreg.zoo.predict import predict

        return predict(fixed, moving, self._model, self.refine)


@register_method("model")
def _model(arg: str) -> Method:
    name, _, options = arg.partition(",")
    refine = 0
    for opt in filter(None, (o.strip() for o in options.split(","))):
        key, _, value = opt.partition("=")
        if key != "refine" or not value.strip().isdigit():
            raise InputError(f"--method model:{arg}: options are refine=N, got {opt!r}")
        refine = int(value)
    return ModelMethod(name, refine)


@register_method("classical")
def _classical(arg: str) -> Method:
    return ClassicalMethod(arg)


@register_method("transforms")
def _transforms(arg: str) -> Method:
    return TransformsMethod(Path(arg))


@register_method("ants")
def _ants(arg: str) -> Method:
    return AntsMethod(arg)


# ---------------------------------------------------------------------------- one pair
def empty_record(method: str, pair: Pair) -> dict:
    rec = dict.fromkeys(RECORD_KEYS)
    rec.update(method=method, pair=pair.name, fixed=str(pair.fixed), moving=str(pair.moving))
    return rec


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


@dataclass
class _Inputs:
    fixed: Image
    moving: Image
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    fixed_points: torch.Tensor | None = None
    moving_points: torch.Tensor | None = None


def load_pair(pair: Pair) -> _Inputs:
    """Read and validate a pair's files; raise :class:`InputError` naming the pair."""
    from learnreg.io.images import read_image, read_labels
    from learnreg.io.points import read_points

    p = f"pair {pair.name}"
    for field in _PATH_FIELDS:
        f = getattr(pair, field)
        if f is not None and not Path(f).exists():
            raise InputError(f"{p}: {field.replace('_', ' ')} {f}: file not found")
    try:
        fixed, moving = read_image(pair.fixed), read_image(pair.moving)
        if fixed.ndim != moving.ndim:
            raise InputError(f"fixed image is {fixed.ndim}D but moving image is {moving.ndim}D")
        for img in (fixed, moving):
            if img.channels != 1:
                raise InputError(f"{img.name}: expected one channel, got {img.channels}")
            img.validate_intensities()
        inp = _Inputs(fixed, moving)
        if pair.fixed_labels is not None and pair.moving_labels is not None:
            fl, ml = read_labels(pair.fixed_labels), read_labels(pair.moving_labels)
            for lab, img in ((fl, fixed), (ml, moving)):
                if not lab.grid.allclose(img.grid, atol=1e-3):
                    raise InputError(f"{lab.name}: label map grid differs from image {img.name}")
            fs = {int(v) for v in torch.unique(fl.data)} - {0}
            ms = {int(v) for v in torch.unique(ml.data)} - {0}
            if fs != ms:
                only_f, only_m = sorted(fs - ms), sorted(ms - fs)
                parts = []
                if only_f:
                    parts.append(f"only in fixed: {_fmt_labels(only_f)}")
                if only_m:
                    parts.append(f"only in moving: {_fmt_labels(only_m)}")
                raise InputError(f"label sets differ ({'; '.join(parts)})")
            inp.fixed_labels, inp.moving_labels = fl, ml
        if pair.fixed_points is not None and pair.moving_points is not None:
            fp = read_points(pair.fixed_points, ndim=fixed.ndim)
            mp = read_points(pair.moving_points, ndim=fixed.ndim)
            if fp.shape[0] != mp.shape[0]:
                raise InputError(
                    f"landmark counts differ: {fp.shape[0]} fixed ({pair.fixed_points}) vs "
                    f"{mp.shape[0]} moving ({pair.moving_points})"
                )
            if fp.shape[0] == 0:
                raise InputError(f"{pair.fixed_points}: no landmarks")
            inp.fixed_points, inp.moving_points = fp, mp
    except InputError as e:
        msg = str(e)
        raise InputError(msg if msg.startswith(p) else f"{p}: {msg}") from None
    return inp


def _fmt_labels(labels: list[int], n: int = 12) -> str:
    s = ", ".join(map(str, labels[:n]))
    return s + (f", … ({len(labels)} in all)" if len(labels) > n else "")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate_pair(
    method: Method | str,
    pair: Pair,
    outdir: PathLike,
    qc: bool = True,
    *,
    measure_memory: bool = False,
) -> dict:
    """Register one pair with ``method`` and compute every metric of the record schema.

    Never raises for a bad pair or a failing registration: the record's ``error`` says what
    went wrong (metrics stay ``None``). ``measure_memory`` fills ``peak_memory_mb`` with this
    process's peak resident memory right after registration (meaningful in a fresh process).
    """
    method = resolve_method(method)
    rec = empty_record(method.name, pair)
    outdir = Path(outdir)
    try:
        _evaluate_into(rec, method, pair, outdir, qc, measure_memory)
    except InputError as e:
        rec["error"] = str(e)
    except Exception as e:  # a failing registration must not lose the other pairs
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        rec["error"] = f"pair {pair.name}: {type(e).__name__}: {e}{where}"
    if rec["error"] is not None:
        for k in RECORD_KEYS[4:-2]:
            if k not in ("seconds", "peak_memory_mb"):
                rec[k] = None
    return rec


def _evaluate_into(rec: dict, method: Method, pair: Pair, outdir: Path, qc: bool, mem: bool):
    from learnreg.eval.metrics import (
        dice_per_label,
        hd95,
        inverse_consistency_error,
        jacobian_stats,
        tre,
    )
    from learnreg.spatial.sampling import resample

    inp = load_pair(pair)
    t0 = time.perf_counter()
    result = method.register(inp.fixed, inp.moving, pair=pair)
    seconds = time.perf_counter() - t0
    # a method may time itself more precisely (e.g. excluding its own file I/O)
    rec["seconds"] = float(result.info.get("seconds", seconds))
    if isinstance(method, TransformsMethod):  # loading files is not registration time
        s = result.info.get("seconds")
        rec["seconds"] = float(s) if isinstance(s, int | float) else None
    if mem:
        rec["peak_memory_mb"] = _peak_mb()
    grid = inp.fixed.grid
    warped_labels = None
    if inp.fixed_labels is not None:
        warped_labels = result.warp(inp.moving_labels, mode="label")
        f_lab, w_lab = inp.fixed_labels.data[0], warped_labels.data[0]
        dice = dice_per_label(f_lab, w_lab)
        hd = hd95(f_lab, w_lab, grid.spacing, labels=sorted(dice))
        rec["dice"] = {str(k): _finite(v) for k, v in dice.items()}
        rec["hd95"] = {str(k): _finite(v) for k, v in hd.items()}
        rec["dice_mean"] = _mean(rec["dice"].values())
        rec["hd95_mean"] = _mean(rec["hd95"].values())
    if inp.fixed_points is not None:
        err, _ = tre(inp.fixed_points, inp.moving_points, result.transform())
        rec["tre_mean"], rec["tre_max"] = float(err.mean()), float(err.max())
    if result.deformable is not None:
        u = result.deformable.voxel_field().detach()
        js = jacobian_stats(u)
        rec["folding_fraction"] = js["folding_fraction"]
        rec["folding_count"] = js["folding_count"]
        rec["sdlogj"] = js["sdlogj"]
        if result.inverse_deformable is not None:
            w = result.inverse_deformable.voxel_field().detach()
            rec["ice_mean"] = inverse_consistency_error(u, w, grid.spacing)["mean"]
    else:  # affine only: the deformable part is the identity
        rec["folding_fraction"], rec["folding_count"], rec["sdlogj"] = 0.0, 0, 0.0
    if qc:
        from learnreg.eval.figures import qc_figure

        rel = Path("figures") / slug(method.name) / f"{pair.name}.png"
        (outdir / rel).parent.mkdir(parents=True, exist_ok=True)
        warped = result.warp(inp.moving)
        qc_figure(
            inp.fixed.data[0].numpy(),
            resample(inp.moving, grid).data[0].numpy(),
            warped.data[0].numpy(),
            outdir / rel,
            displacement=None
            if result.deformable is None
            else result.deformable.voxel_field()[0].detach().numpy(),
            labels=None
            if warped_labels is None
            else (inp.fixed_labels.data[0].numpy(), warped_labels.data[0].numpy()),
            title=_qc_title(method.name, pair, rec),
            grid=grid,
        )
        rec["qc_png"] = rel.as_posix()


def _qc_title(method: str, pair: Pair, rec: dict) -> str:
    bits = [f"{method}  |  {Path(pair.moving).name} → {Path(pair.fixed).name}"]
    if rec["dice_mean"] is not None:
        bits.append(f"Dice {rec['dice_mean']:.3f}")
    if rec["hd95_mean"] is not None:
        bits.append(f"HD95 {rec['hd95_mean']:.2f} mm")
    if rec["tre_mean"] is not None:
        bits.append(f"TRE {rec['tre_mean']:.2f} mm")
    if rec["seconds"] is not None:
        bits.append(f"{rec['seconds']:.1f} s")
    return "  |  ".join(bits)


# ---------------------------------------------------------------------------- many pairs
def record_path(outdir: PathLike, method_name: str, pair: Pair) -> Path:
    return Path(outdir) / "records" / slug(method_name) / f"{pair.name}.json"


def _load_cached(path: Path, method: str, pair: Pair) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ok = (
        isinstance(rec, dict)
        and rec.get("error") is None
        and rec.get("method") == method
        and rec.get("fixed") == str(pair.fixed)
        and rec.get("moving") == str(pair.moving)
        and set(RECORD_KEYS) <= set(rec)
    )
    return rec if ok else None


def _save(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, rec)


def _run_isolated(spec: str, pair: Pair, outdir: Path, qc: bool) -> dict:
    """Evaluate in a fresh interpreter so that peak memory is this pair's own."""
    method_name = resolve_method(spec).name
    with tempfile.TemporaryDirectory(prefix="learnreg-eval-") as tmp:
        out = Path(tmp) / "record.json"
        cmd = [
            sys.executable, "-m", "learnreg.eval.evaluate", "--worker",
            "--method", spec, "--method-name", method_name,
            "--pair", json.dumps(pair.to_dict()), "--outdir", str(outdir), "--record", str(out),
        ]  # fmt: skip
        if not qc:
            cmd.append("--no-qc")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0 and out.is_file():
            return json.loads(out.read_text())
    rec = empty_record(method_name, pair)
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    how = (
        f"killed by signal {-done.returncode}"
        if done.returncode < 0
        else f"exit code {done.returncode}"
    )
    rec["error"] = f"pair {pair.name}: worker process failed ({how}): {tail[0][:300]}"
    return rec


def evaluate(
    methods: Sequence[str | Method],
    pairs: Sequence[Pair],
    outdir: PathLike,
    resume: bool = True,
    isolate: bool = False,
    progress: bool = True,
    qc: bool = True,
    report: bool = True,
) -> list[dict]:
    """Evaluate every method on every pair; write records, QC figures and the report.

    Args:
        methods: specs (``classical:default``, ``ants:SyN``, ``transforms:DIR``, ...) or
            :class:`Method` objects (those cannot be ``isolate``d: specs travel to the worker).
        pairs: from :func:`pairs_from_csv`, :func:`atlas_pairs` or a suite.
        outdir: report folder; records are cached in ``outdir/records/<method>/<pair>.json``.
        resume: reuse cached records of pairs that finished without error.
        isolate: one fresh process per (method, pair), so ``peak_memory_mb`` is its own.
        progress: rich progress bar on stderr.
        report: finish with ``learnreg.eval.report.write_report(records, outdir)``.

    Returns the records, method by method in the order given, pairs in order.
    """
    outdir = Path(outdir)
    if not methods:
        raise InputError("no methods to evaluate (give at least one --method)")
    if not pairs:
        raise InputError("no pairs to evaluate")
    names = [p.name for p in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"pair names must be unique; repeated: {', '.join(dup)}")
    resolved = [resolve_method(m) for m in methods]
    mnames = [m.name for m in resolved]
    if len(set(map(slug, mnames))) != len(mnames):
        raise InputError(f"method names must be distinct; got {mnames} (use LABEL=SPEC)")
    if isolate and not all(isinstance(m, str) for m in methods):
        raise InputError("isolate=True needs methods given as spec strings")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{outdir}: cannot create the output folder ({e.strerror})") from None

    records: list[dict] = []
    with _progress(progress, len(resolved) * len(pairs)) as step:
        for spec, method in zip(methods, resolved, strict=True):
            for pair in pairs:
                path = record_path(outdir, method.name, pair)
                rec = _load_cached(path, method.name, pair) if resume else None
                if rec is None:
                    step(f"{method.name} · {pair.name}", advance=0)
                    if isolate:
                        rec = _run_isolated(spec, pair, outdir, qc)
                    else:
                        rec = evaluate_pair(method, pair, outdir, qc)
                    _save(path, rec)
                records.append(rec)
                step(f"{method.name} · {pair.name}", advance=1)
    if report:
        from learnreg.eval.report import write_report

        write_report(records, outdir)
    return records


class _progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda desc, advance=1: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description:<40.40}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.bar.__enter__()
        task = self.bar.add_task("evaluate", total=self.total)

        def step(desc: str, advance: int = 1) -> None:
            self.bar.update(task, description=desc, advance=advance)

        return step

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


# ---------------------------------------------------------------------------- worker
def _worker(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m learnreg.eval.evaluate")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--method-name", default=None)
    p.add_argument("--pair", required=True, help="JSON of Pair.to_dict()")
    p.add_argument("--outdir", required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--no-qc", action="store_true")
    a = p.parse_args(argv)
    pair = Pair.from_dict(json.loads(a.pair))
    try:
        method = resolve_method(a.method)
    except InputError as e:
        rec = empty_record(a.method_name or a.method, pair)
        rec["error"] = str(e)
    else:
        rec = evaluate_pair(method, pair, a.outdir, qc=not a.no_qc, measure_memory=True)
    write_json(Path(a.record), rec)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_worker())
