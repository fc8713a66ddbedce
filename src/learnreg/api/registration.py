"""The Python API: ``learnreg.register``, ``learnreg.load_result``, ``learnreg.apply``.

The command line calls the same functions (``learnreg register`` is :func:`register` followed
by :meth:`Registration.save`), so a result made either way is the same result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from learnreg.api.outputs import write_outputs
from learnreg.api.projection import ProjectionPlan, ProjectionRegistration
from learnreg.core.device import resolve_device
from learnreg.core.errors import InputError
from learnreg.core.image import Image
from learnreg.core.options import check_option
from learnreg.core.run_folder import output_folder
from learnreg.io.objects import ImageLike, as_image, like
from learnreg.io.result import ants_apply_arguments, save_result
from learnreg.io.result import load_result as _load_folder
from learnreg.io.transforms import read_affine, to_sitk_transform
from learnreg.optimize.classical import Progress, check_pair
from learnreg.optimize.classical import register as classical_register
from learnreg.optimize.config import INITS, ClassicalConfig
from learnreg.optimize.config import preset as classical_preset
from learnreg.optimize.masks import MetricMasks
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.result import RegistrationResult
from learnreg.zoo.models import (
    PretrainedModel,
    auto_candidates,
    available_models,
    load_model,
    model_summary,
    untrained_model,
)
from learnreg.zoo.predict import predict
from learnreg.zoo.projection import check_projection_pair

__all__ = [
    "Registration",
    "RegistrationPlan",
    "register",
    "plan_registration",
    "load_result",
    "apply",
    "choose_model",
    "as_initial",
]

InitialLike = Any
"""An :class:`AffineTransform`, an ITK/ANTs affine file (``.mat``/``.txt``/``.h5``), ``(file,
True)`` for its inverse, or a world (RAS mm) fixed→moving matrix ``(D+1, D+1)``."""


class Registration:
    """The result of :func:`register` or :func:`load_result`.

    ``result`` is the :class:`~learnreg.spatial.result.RegistrationResult` (fixed world →
    moving world). Images and label maps given to :meth:`warp` may be any of what
    :func:`register` accepts and come back as the same kind of object (a nibabel image for a
    nibabel image, ...; an :class:`~learnreg.core.Image` for a path).
    """

    def __init__(
        self,
        result: RegistrationResult,
        fixed: Image | None = None,
        moving: Image | None = None,
        fixed_labels: Image | None = None,
        moving_labels: Image | None = None,
        folder: Path | None = None,
    ) -> None:
        self.result = result
        self.fixed, self.moving = fixed, moving
        self.fixed_labels, self.moving_labels = fixed_labels, moving_labels
        self.folder = folder

    def __repr__(self) -> str:
        parts = [p for p in ("affine", "deformable") if getattr(self.result, p) is not None]
        engine = self.result.info.get("engine", self.result.info.get("method", "?"))
        return f"Registration({self.result.ndim}D, {' + '.join(parts) or 'identity'}; {engine})"

    @property
    def info(self) -> dict:
        return self.result.info

    @property
    def warped(self) -> Image:
        """The moving image resampled onto the fixed grid."""
        if self.moving is None:
            raise ValueError("this registration was loaded from files: warp(moving) instead")
        return self.result.warp(self.moving)

    def warp(self, image: ImageLike, labels: bool = False, inverse: bool = False) -> Any:
        """Resample a moving-space image (or label map, label-safe: one-hot linear +
        argmax) onto the fixed grid; ``inverse``: a fixed-space one onto the moving grid."""
        img = as_image(image, labels=labels)
        if img.ndim != self.result.ndim:
            raise InputError(
                f"{img.name}: {img.ndim}D input for a {self.result.ndim}D registration"
            )
        mode = "label" if labels else "linear"
        out = self.result.warp_inverse(img, mode) if inverse else self.result.warp(img, mode)
        return like(image, out)

    def map_points(self, points: Any, inverse: bool = False) -> np.ndarray:
        """World points ``(P, D)`` (RAS mm) from fixed to moving space, or from moving to
        fixed space with ``inverse`` (how moving-space landmarks reach the fixed image)."""
        pts = torch.as_tensor(np.asarray(points, dtype=np.float64))
        if pts.ndim != 2 or pts.shape[1] != self.result.ndim:
            raise InputError(
                f"points of shape {tuple(pts.shape)}: expected (P, {self.result.ndim})"
            )
        return self.result.map_points(pts, inverse=inverse).double().numpy()

    def save(
        self,
        folder: str | Path,
        qc: bool = False,
        formats: Sequence[str] = ("ants",),
        overwrite: bool = False,
        jacobian: bool = False,
        warp_grid: str = "native",
    ) -> Path:
        """Write the result folder ``learnreg register`` writes (transforms, ``result.json``;
        with the images: warped image and ``metrics.json``, plus ``jacobian.nii.gz`` with
        ``jacobian`` and ``qc.png`` with ``qc``), atomically: a failed save leaves nothing
        half written. ``formats``: the transform file sets, ``"ants"`` (always) and ``"h5"``
        (ITK composites); ``warp_grid``: warps on the grid they were computed on
        (``"native"``) or on the fixed image's (``"fixed"``). A folder that is not empty is
        refused unless ``overwrite`` (then replaced as a whole)."""
        folder = Path(folder)
        with output_folder(folder, overwrite, "Registration.save") as stage:
            self.write(stage, qc, formats, jacobian, warp_grid)
        self.folder = folder
        return folder

    def write(
        self,
        folder: Path,
        qc: bool = False,
        formats: Sequence[str] = ("ants",),
        jacobian: bool = False,
        warp_grid: str = "native",
    ) -> dict:
        """What :meth:`save` writes, directly into the existing folder ``folder``; returns
        the metrics (empty without the images)."""
        if self.fixed is None or self.moving is None:
            save_result(self.result, folder, formats, warp_grid)
            return {}
        return write_outputs(
            self.result,
            self.fixed,
            self.moving,
            Path(folder),
            self.fixed_labels,
            self.moving_labels,
            qc=qc,
            formats=formats,
            jacobian=jacobian,
            warp_grid=warp_grid,
        )

    def to_sitk(self, inverse: bool = False):
        """A SimpleITK ``CompositeTransform`` that maps points as this result (fixed →
        moving in LPS; ``inverse``: moving → fixed), for ``sitk.Resample(moving, fixed,
        tx)`` (``inverse``: ``sitk.Resample(fixed, moving, tx)``)."""
        t = self.result.inverse_transform() if inverse else self.result.transform()
        return to_sitk_transform(t, self.result.moving_grid if inverse else self.result.fixed_grid)

    def to_ants(self, inverse: bool = False) -> dict[str, list]:
        """Keyword arguments ``transformlist`` and ``whichtoinvert`` for
        ``ants.apply_transforms(fixed, moving, **reg.to_ants())`` (``inverse``:
        ``ants.apply_transforms(moving, fixed, **reg.to_ants(inverse=True))``), reading the
        files of the folder this result was saved to or loaded from."""
        if self.folder is None:
            raise ValueError("save(folder) first: ANTsPy reads transforms from files")
        return ants_apply_arguments(self.folder, inverse)


def as_initial(initial: InitialLike, ndim: int) -> AffineTransform:
    """An initial transform as an :class:`AffineTransform` (world, fixed → moving)."""
    if isinstance(initial, AffineTransform):
        return initial
    if isinstance(initial, tuple) and len(initial) == 2 and isinstance(initial[1], bool):
        return read_affine(initial[0], invert=initial[1])
    if isinstance(initial, str | Path):
        return read_affine(initial)
    m = np.asarray(initial, dtype=np.float64)
    if m.shape != (ndim + 1, ndim + 1) or not np.isfinite(m).all():
        raise InputError(
            f"initial transform: expected a finite {ndim + 1}x{ndim + 1} matrix, got {m.shape}"
        )
    return AffineTransform(torch.from_numpy(m).float())


def _classical_config(preset: str, config: ClassicalConfig | dict | str | Path | None):
    if isinstance(config, ClassicalConfig):
        return config.validate()
    if isinstance(config, str | Path):
        try:
            config = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise InputError(f"{config}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise InputError(f"{config}: invalid YAML ({e})") from None
    try:
        return ClassicalConfig.from_dict(config) if config is not None else classical_preset(preset)
    except (TypeError, ValueError) as e:
        raise InputError(f"{'preset' if config is None else 'config'}: {e}") from None


@dataclass
class RegistrationPlan:
    """A checked registration, ready to run: inputs read and validated, the path chosen
    (:attr:`why` says which and why). :func:`register` is ``plan_registration(...).run()``;
    the command line prints :attr:`why` and prepares its output folder in between."""

    fixed: Image
    moving: Image
    fixed_labels: Image | None
    moving_labels: Image | None
    model: PretrainedModel | None
    why: str
    config: ClassicalConfig
    refine: int = 0
    initial: AffineTransform | None = None
    init: str | None = None
    fixed_mask: Image | None = None
    moving_mask: Image | None = None
    device: torch.device = torch.device("cpu")

    def run(self, progress: Progress | None = None) -> Registration:
        t0 = time.perf_counter()
        f, m = self.fixed, self.moving
        masks = {"fixed_mask": self.fixed_mask, "moving_mask": self.moving_mask}
        if self.model is None:
            result = classical_register(f, m, self.config, self.initial, progress, **masks)
        else:
            result = predict(
                f,
                m,
                self.model,
                self.refine,
                progress,
                self.initial,
                self.init,
                device=self.device,
                **masks,
            )
        result.info["seconds"] = time.perf_counter() - t0
        result.info["engine"] = self.why
        return Registration(result, f, m, self.fixed_labels, self.moving_labels)


def register(
    fixed: ImageLike,
    moving: ImageLike,
    method: str | Path = "auto",
    *,
    progress: Progress | None = None,
    verbose: bool = False,
    **options: Any,
) -> Registration | ProjectionRegistration:
    """Register ``moving`` to ``fixed``, as ``learnreg register`` does:
    ``plan_registration(fixed, moving, method, **options).run(progress)``.

    ``options`` are :func:`plan_registration`'s: ``preset``, ``config``, ``refine``,
    ``initial``, ``init``, ``fixed_mask``, ``moving_mask``, ``fixed_labels``,
    ``moving_labels``, ``device``. ``progress`` is called ``(stage, iteration, total, loss)``;
    ``verbose`` prints which path runs and why before it runs.

    Returns a :class:`Registration`; ``info["engine"]`` says which path ran and why.
    """
    plan = plan_registration(fixed, moving, method, **options)
    if verbose:
        print(f"learnreg register: {plan.why}")
    return plan.run(progress)


def plan_registration(
    fixed: ImageLike,
    moving: ImageLike,
    method: str | Path = "auto",
    *,
    preset: str = "default",
    config: ClassicalConfig | dict | str | Path | None = None,
    refine: int = 0,
    initial: InitialLike | None = None,
    init: str | None = None,
    fixed_mask: ImageLike | None = None,
    moving_mask: ImageLike | None = None,
    fixed_labels: ImageLike | None = None,
    moving_labels: ImageLike | None = None,
    device: str = "cpu",
) -> RegistrationPlan | ProjectionPlan:
    """Read and check everything a registration is given and choose its path, without
    registering (:func:`register` runs the plan). A 2D fixed X-ray and a 3D moving volume
    with the checkpoint of a 2D/3D (projection) method make a :class:`~learnreg.api.
    projection.ProjectionPlan` (:mod:`learnreg.api.projection`); any other pair of two
    dimensionalities is refused.

    Args:
        fixed, moving: paths, nibabel / SimpleITK / ANTsPy images, or ``(array, affine)``.
        method: ``"auto"`` (a shipped pretrained model when one suits the pair and no
            classical preset or config was asked for, else classical), ``"classical"``, a
            shipped model's or learned method's name, or a checkpoint path.
        preset, config: the classical registration's preset name, or a configuration (a
            :class:`ClassicalConfig`, its dict, or a YAML file); also the pre-alignment's
            starting point.
        refine: optimization steps from a network's prediction.
        initial: starting affine (see :data:`InitialLike`); default: centres of mass.
        init: ``"com"`` or ``"search"`` (also a coarse search over rotations, for headers
            wrong by a large rotation); default: the configuration's (``com``).
        fixed_mask, moving_mask: the similarity counts only voxels inside both (value > 0),
            as ANTs' ``-x``; with a model, in its pre-alignment and refinement.
        fixed_labels, moving_labels: label maps, for Dice in :meth:`Registration.save`'s
            ``metrics.json``.
        device: where a network runs: ``cpu`` (default), ``cuda``, ``cuda:N`` or ``auto``
            (a GPU where one is available); classical optimization runs on the CPU.
    """
    if refine < 0:
        raise InputError(f"refine must be >= 0, got {refine}")
    dev = resolve_device(device)
    cfg = _classical_config(preset, config)
    if init is not None:
        cfg.init = check_option("init", init, INITS, InputError)
    f = as_image(fixed, name=_name(fixed, "fixed"))
    m = as_image(moving, name=_name(moving, "moving"))
    fl = None if fixed_labels is None else as_image(fixed_labels, labels=True)
    ml = None if moving_labels is None else as_image(moving_labels, labels=True)
    for lab, img in ((fl, f), (ml, m)):
        if lab is not None and not lab.grid.allclose(img.grid, atol=1e-3):
            raise InputError(f"{lab.name}: label map grid differs from its image {img.name}")
    fmask = None if fixed_mask is None else as_image(fixed_mask, labels=True)
    mmask = None if moving_mask is None else as_image(moving_mask, labels=True)
    model_path = Path(method) if _is_path(method) else None
    if f.ndim != m.ndim and model_path is not None:
        model = load_model(model_path)
        if model.method.projection:  # a 2D/3D method: X-ray (fixed) and volume (moving)
            asked = {
                "refine": refine,
                "initial": initial,
                "init": init,
                "fixed_mask": fixed_mask,
                "moving_mask": moving_mask,
                "fixed_labels": fixed_labels,
                "moving_labels": moving_labels,
            }
            extra = [k for k, v in asked.items() if v]
            if extra:
                raise InputError(
                    f"{model_path}: a 2D/3D registration by {model.method.name} takes no "
                    f"{', '.join(extra)}"
                )
            check_projection_pair(f, m, model)
            why = f"using pretrained 2D/3D model {model_summary(model)}"
            return ProjectionPlan(f, m, model, why, dev)
    MetricMasks(f, m, fmask, mmask)  # checks them now, before any work
    check_pair(f, m)
    start = None if initial is None else as_initial(initial, f.ndim)
    classical_asked = config is not None or preset != "default"
    model, why = choose_model(f, m, str(method), model_path, classical_asked)
    if refine and model is None:
        raise InputError(
            "--refine N (refine=N) refines a network's prediction: use it with a learned "
            f"model (--method NAME or --model PATH; in Python, its name or checkpoint); {why}"
        )
    if dev.type != "cpu":
        why += f" (network on {dev})" if model is not None else " (on the CPU: it has no GPU path)"
    return RegistrationPlan(f, m, fl, ml, model, why, cfg, refine, start, init, fmask, mmask, dev)


def _is_path(method: str | Path) -> bool:
    """A checkpoint path rather than a method or model name."""
    text = str(method)
    return (
        isinstance(method, Path)
        or "/" in text
        or "\\" in text
        or text.endswith((".pt", ".pth"))
        or Path(text).is_file()
    )


def _name(obj: ImageLike, role: str) -> str | None:
    return None if isinstance(obj, str | Path) else role


def choose_model(
    fixed: Image,
    moving: Image,
    method: str = "auto",
    model_path: Path | None = None,
    classical_asked: bool = False,
) -> tuple[PretrainedModel | None, str]:
    """The trained model to use (or None for classical registration) and a line saying why.

    ``model_path`` wins; ``method`` is ``auto`` (a shipped model when one suits the pair and
    no classical preset or config was asked for, else classical), ``classical``, a shipped
    model's name, or a method name with a shipped model.
    """
    if model_path is not None:
        model = load_model(model_path)
        model.check_pair(fixed, moving)
        return model, _using(model, fixed, moving, forced=True)
    key = method.strip().lower()
    if key == "classical" or (key == "auto" and classical_asked):
        return None, "using classical registration (as asked)"
    shipped = available_models()
    if key == "auto":
        reasons = []
        for name in auto_candidates():
            model = load_model(name)
            why = model.unsuitable(fixed, moving)
            if why is None:
                return model, _using(model, fixed, moving)
            reasons.append(f"{name}: {why}")
        detail = "; ".join(reasons) if reasons else "no pretrained model is installed"
        return None, f"using classical registration (no pretrained model suits: {detail})"
    for name in shipped:
        model = load_model(name)
        if key in (name.lower(), model.method.name):
            return model, _using(model, fixed, moving, forced=True)
    untrained = untrained_model(key, fixed)
    if untrained is not None:  # a method without learned weights needs no checkpoint
        untrained.check_pair(fixed, moving)
        return untrained, f"using {model_summary(untrained)}"
    raise InputError(
        f"method {method!r}: no pretrained model of that name or method (shipped: "
        f"{', '.join(shipped) or 'none'}); use 'classical', or train one with "
        "`learnreg train` and pass its checkpoint"
    )


def _using(model: PretrainedModel, fixed: Image, moving: Image, forced: bool = False) -> str:
    steps = f" after {model.prealign} alignment" if model.prealign else ""
    line = f"using pretrained model {model_summary(model)}{steps}"
    why = model.unsuitable(fixed, moving) if forced else None
    return line + (f" — warning: {why}" if why else "")


def load_result(folder: str | Path) -> Registration:
    """A result folder written by :meth:`Registration.save` or ``learnreg register``."""
    folder = Path(folder)
    return Registration(_load_folder(folder), folder=folder)


def apply(
    result: Registration | str | Path,
    image: ImageLike,
    labels: bool = False,
    inverse: bool = False,
) -> Any:
    """Warp ``image`` with ``result`` (a :class:`Registration` or a result folder): moving
    space onto the fixed grid, or fixed onto moving with ``inverse``; label maps with
    ``labels`` (label-safe: one-hot linear + argmax)."""
    reg = result if isinstance(result, Registration) else load_result(result)
    return reg.warp(image, labels=labels, inverse=inverse)
