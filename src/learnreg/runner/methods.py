"""Method adapters: what ``--method`` specs name, each turned into a :class:`Method`.

A *method* is anything with ``.name`` and ``.register(fixed, moving, pair=None) ->
RegistrationResult``; specs name them on the command line:

- ``classical:PRESET``: :func:`learnreg.optimize.classical.register` with that preset;
- ``model:NAME[,refine=N]``: a trained network (shipped name, model folder or checkpoint)
  through :func:`learnreg.zoo.predict.predict`, optionally refined;
- ``transforms:DIR``: precomputed transforms in ``DIR/<pair name>/``, either a learnreg result
  folder (``result.json``) or ANTs outputs (``*0GenericAffine.mat``, ``*1Warp.nii.gz``, optional
  ``*1InverseWarp.nii.gz``), read with learnreg's ITK/ANTs readers;
- ``ants:TYPE``: ``ants.registration(type_of_transform=TYPE)`` (antspyx), read back through the
  files ANTs writes, exactly as ``transforms:`` would.

``LABEL=SPEC`` names a method ``LABEL`` in the tables. New kinds plug in with
:func:`register_method`.

A method may say what its result for a pair depends on besides the pair's own files
(``fingerprint(pair)``: its resolved configuration, the files it reads): evaluation reuses a
cached record only while that is unchanged.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from learnreg.core.errors import InputError
from learnreg.core.image import Image
from learnreg.data.datasets import Pair
from learnreg.spatial.result import RegistrationResult

__all__ = [
    "Method",
    "register_method",
    "resolve_method",
    "method_kinds",
    "slug",
    "file_signature",
    "read_result_folder",
    "ClassicalMethod",
    "ModelMethod",
    "TransformsMethod",
    "AntsMethod",
]

PathLike = str | os.PathLike


@runtime_checkable
class Method(Protocol):
    """A registration method as the runner sees it.

    A method whose results were computed elsewhere (precomputed transforms) sets
    ``precomputed = True``: loading them is not registration time, so its time is the one
    recorded with the result, if any.
    """

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


def file_signature(path: PathLike) -> list | None:
    """``[size, mtime_ns]`` of a file; of a folder, ``[name, size, mtime_ns]`` of every file
    in it; None when ``path`` does not exist. Rewriting a file changes its signature."""
    path = Path(path)
    if path.is_dir():
        return [
            [f.relative_to(path).as_posix(), *file_signature(f)]
            for f in sorted(path.rglob("*"))
            if f.is_file()
        ]
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


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


# ---------------------------------------------------------------------------- adapters
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

    def fingerprint(self, pair: Pair) -> dict:
        from learnreg.optimize.config import preset

        return {"classical": preset(self.preset).to_dict()}

    def register(self, fixed: Image, moving: Image, pair: Pair | None = None):
        from learnreg.optimize.classical import register

        return register(fixed, moving, self.preset)


@dataclass
class TransformsMethod:
    """Precomputed transforms: ``folder/<pair name>/`` per pair."""

    folder: Path
    name: str = ""
    precomputed: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if not self.folder.is_dir():
            raise InputError(f"--method transforms:{self.folder}: folder not found")
        self.name = self.name or f"transforms:{self.folder.name}"

    def fingerprint(self, pair: Pair) -> dict:
        sub = self.folder / pair.name
        return {"transforms": str(sub.absolute()), "files": file_signature(sub)}

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

    def fingerprint(self, pair: Pair) -> dict:
        import ants

        return {"ants": self.type_of_transform, "antspyx": getattr(ants, "__version__", None)}

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

    def fingerprint(self, pair: Pair) -> dict:
        path = Path(self._model.path or self.model).absolute()
        return {"model": str(path), "file": file_signature(path), "refine": self.refine}

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
