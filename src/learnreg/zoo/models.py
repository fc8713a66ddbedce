"""Trained models: the ones shipped with learnreg, and any checkpoint ``learnreg train`` wrote.

A model is one learnreg checkpoint (:mod:`learnreg.train.checkpoint`, loaded with
``weights_only=True``) holding the method's name and weights, the resolved training config
(which says how pairs were pre-aligned) and, in ``extra``, the preprocessing that defines the
network grid. Shipped models live in this package as ``zoo/<name>/model.pt`` beside their
model card ``zoo/<name>/README.md``; their ``extra["card"]`` also records the training run,
the validation metrics and the inputs the model suits (:meth:`PretrainedModel.unsuitable`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.data.fingerprint import is_atlas
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.methods.base import RegistrationMethod
from learnreg.methods.registry import create_method
from learnreg.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "ZOO",
    "PretrainedModel",
    "available_models",
    "load_model",
    "resolve_model",
    "export_model",
    "background_fraction",
    "model_summary",
    "untrained_model",
]

ZOO = Path(__file__).resolve().parent
"""Folder of the shipped models."""


AUTO_ORDER = ("lpba40-vxm-svf", "lpba40-vxm-unsup")
"""The shipped models ``auto`` tries, in order: the weakly supervised atlas model before the
unsupervised one (0.735 vs 0.672 validation Dice); both suit only pairs whose fixed image is
their atlas. Other shipped models run only when named: the subject-to-subject
``lpba40-vxm-pairs`` scores below the classical default on pairs of LPBA40 validation
subjects (its model card has the numbers), so ``auto`` registers such pairs classically."""


def available_models() -> list[str]:
    """Names of the models shipped with learnreg."""
    return sorted(p.parent.name for p in ZOO.glob("*/model.pt"))


def auto_candidates() -> list[str]:
    """The installed models of :data:`AUTO_ORDER`, in that order."""
    shipped = available_models()
    return [n for n in AUTO_ORDER if n in shipped]


def background_fraction(image: Image) -> float:
    """Fraction of voxels at (within 1 % of the range of) the image's minimum: large for
    skull-stripped brains in a head-sized box, small for images with skull and neck."""
    x = image.data[0].reshape(-1).float()
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return 1.0
    return float((x <= lo + 0.01 * (hi - lo)).float().mean())


@dataclass
class PretrainedModel:
    """A trained registration network with everything needed to apply it.

    Attributes:
        name: the zoo name, or the checkpoint's path.
        method: the network (eval mode, on CPU).
        preprocessor: how images are put on the network grid.
        prealign: classical preset run before the network (``"affine"``, ``"rigid"``) or None.
        reference: the network grid the model was trained on.
        card: the model card's data (training run, metrics, suitability limits).
        path: the checkpoint file.
        atlas: :func:`~learnreg.data.fingerprint.atlas_fingerprint` of the fixed image of
            an atlas-to-subject model.
    """

    name: str
    method: RegistrationMethod
    preprocessor: Preprocessor
    prealign: str | None
    reference: Grid
    card: dict = field(default_factory=dict)
    path: Path | None = None
    atlas: dict | None = None

    @property
    def ndim(self) -> int:
        return self.reference.ndim

    def grid_for(self, fixed: Image) -> Grid:
        """The network grid for a fixed image: the training spacing over its field of view."""
        return self.preprocessor.grid_for(fixed)

    def unsuitable(self, fixed: Image, moving: Image) -> str | None:
        """Why this model should not register the pair (``None`` when it suits).

        Checks the card's ``suits`` limits: dimensionality, single channel, voxel spacing no
        coarser than ``max_spacing`` mm, field of view within ``extent`` times the training
        grid's per axis, and at least ``min_background`` of each image at its minimum
        (skull-stripped brains, like the training data); a model trained atlas-to-subject
        (:attr:`atlas`) suits only pairs whose fixed image is its atlas.
        """
        suits = self.card.get("suits", {})
        for im in (fixed, moving):
            cannot = self._cannot_take(im)
            if cannot is not None:
                return cannot
            max_spacing = suits.get("max_spacing")
            if max_spacing is not None and max(im.grid.spacing) > max_spacing:
                return (
                    f"{im.name} has {max(im.grid.spacing):.2f} mm voxels, coarser than the "
                    f"model's limit of {max_spacing} mm"
                )
            extent = suits.get("extent")
            if extent is not None:
                ratio = sorted(np.asarray(im.grid.extent)) / np.sort(self.reference.extent)
                if ratio.min() < extent[0] or ratio.max() > extent[1]:
                    return (
                        f"{im.name}'s field of view ({_mm(im.grid.extent)}) is unlike the "
                        f"training images' ({_mm(self.reference.extent)})"
                    )
            min_bg = suits.get("min_background")
            if min_bg is not None and background_fraction(im) < min_bg:
                return (
                    f"{im.name} does not look skull-stripped ({background_fraction(im):.0%} "
                    f"background, the model expects at least {min_bg:.0%})"
                )
        if self.atlas is not None and not is_atlas(fixed, self.atlas):
            return (
                f"it was trained atlas-to-subject with fixed image {self.atlas['name']}, and "
                f"{fixed.name} is not that image"
            )
        return None

    def check_pair(self, fixed: Image, moving: Image) -> None:
        """Raise :class:`InputError` naming the model's file when the network cannot take the
        pair at all (another dimensionality, several channels); the card's softer limits
        (:meth:`unsuitable`) only warn when a model is chosen by hand."""
        for im in (fixed, moving):
            cannot = self._cannot_take(im)
            if cannot is not None:
                raise InputError(f"{self.path or self.name}: cannot register this pair: {cannot}")

    def _cannot_take(self, im: Image) -> str | None:
        if im.ndim != self.ndim:
            return f"{im.name} is {im.ndim}D, the model is {self.ndim}D"
        if im.channels != 1:
            return f"{im.name} has {im.channels} channels, the model takes one"
        return None


def _mm(extent) -> str:
    return "×".join(f"{float(e):.0f}" for e in extent) + " mm"


def resolve_model(name_or_path: str | os.PathLike) -> tuple[str, Path]:
    """``(name, model file)`` of a model folder, a checkpoint file or a shipped model name."""
    p = Path(name_or_path)
    if p.is_dir() and (p / "model.pt").is_file():
        return str(p), p / "model.pt"
    if p.is_file():
        return str(p), p
    name = str(name_or_path)
    if (ZOO / name / "model.pt").is_file():
        return name, ZOO / name / "model.pt"
    known = ", ".join(available_models()) or "none"
    raise InputError(
        f"{name}: no such model file, folder, or shipped model (shipped models: {known})"
    )


def load_model(name_or_path: str | os.PathLike) -> PretrainedModel:
    """A shipped model by name, a zoo-style folder, or a checkpoint of ``learnreg train``.

    Raises :class:`InputError` for unknown names, unreadable or untrusted files, checkpoints
    of other learnreg versions, and checkpoints without preprocessing records.
    """
    name, path = resolve_model(name_or_path)
    state = load_checkpoint(path)
    extra = state.get("extra") or {}
    config = state.get("config") or {}
    if not isinstance(extra, dict) or not isinstance(config, dict):
        raise InputError(f"{path}: corrupt checkpoint (its config or extra is not a mapping)")
    pre = extra.get("preprocess")
    grid = extra.get("grid")
    if not isinstance(pre, dict) or not isinstance(grid, dict):
        raise InputError(f"{path}: checkpoint lacks the preprocessing record of its training")
    try:
        method = create_method(state["method"], **(config.get("method_config") or {}))
        method.load_state_dict(state["model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(
            f"{path}: cannot rebuild method {state['method']!r} ({_first_line(e)})"
        ) from None
    method.eval()
    try:
        preprocessor, reference = _preprocessing(pre), Grid.from_dict(grid)
        prealign = (config.get("data") or {}).get("prealign")
        card = dict(extra.get("card") or {})
        atlas = extra.get("atlas")
        if atlas is not None:
            atlas = {
                "name": str(atlas["name"]),
                "grid": Grid.from_dict(atlas["grid"]).to_dict(),
                "thumbnail": torch.as_tensor(atlas["thumbnail"]),
            }
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise InputError(
            f"{path}: corrupt preprocessing record in the checkpoint ({_first_line(e)})"
        ) from None
    return PretrainedModel(name, method, preprocessor, prealign, reference, card, path, atlas)


def untrained_model(name: str, fixed: Image) -> PretrainedModel | None:
    """A method without learned weights (:attr:`~learnreg.methods.base.RegistrationMethod.
    learned` false) as a model for ``fixed``, or None when ``name`` is no such method: its
    default configuration on the fixed image's own spacing and field of view (RAS), intensities
    normalized to the 1st–99th percentiles, no pre-alignment."""
    from learnreg.methods.registry import method_info

    try:
        info = method_info(name)
    except ValueError:
        return None
    if info.cls.learned:
        return None
    method = create_method(info.name).eval()
    ndim = method.config.get("ndim")
    if ndim is not None and ndim != fixed.ndim:
        raise InputError(f"{info.name} registers {ndim}D images; {fixed.name} is {fixed.ndim}D")
    pre = Preprocessor(NetworkGrid())
    card = {"title": f"no learned weights; {info.reference}"}
    return PretrainedModel(info.name, method, pre, None, pre.grid_for(fixed), card)


def _preprocessing(pre: dict) -> Preprocessor:
    """The :class:`Preprocessor` a checkpoint's ``extra["preprocess"]`` records."""
    net = pre["network"]
    return Preprocessor(
        NetworkGrid(
            None if net.get("shape") is None else tuple(net["shape"]),
            None if net.get("spacing") is None else tuple(net["spacing"]),
            net.get("orientation", "RAS"),
            int(net.get("levels", 0)),
        ),
        pre.get("percentiles"),
        bool(pre.get("antialias", True)),
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def export_model(
    checkpoint: str | os.PathLike, output: str | os.PathLike, card: dict | None = None
) -> Path:
    """Write a training checkpoint as a shippable model: weights, config and preprocessing,
    with ``card`` (training record, metrics, ``suits`` limits) in ``extra``; no optimizer or
    RNG state. Returns the written ``model.pt``."""
    state = load_checkpoint(checkpoint)
    extra = dict(state.get("extra") or {})
    keep = {
        k: extra[k] for k in ("grid", "preprocess", "best_dice", "elapsed", "atlas") if k in extra
    }
    keep["card"] = card or {}
    model = {k: v.detach().clone().contiguous() for k, v in state["model"].items()}
    out = Path(output)
    out = out / "model.pt" if out.suffix != ".pt" else out
    return save_checkpoint(
        out,
        model=model,
        method=state["method"],
        step=state["step"],
        config=state["config"],
        rng={},
        extra=_finite(keep),
    )


def _finite(x):
    """Replace non-finite floats (``-inf`` best Dice of runs without validation) by None."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def model_summary(model: PretrainedModel) -> str:
    """One line naming the model for logs and the CLI."""
    card = model.card
    what = card.get("title") or model.method.name
    return f"{model.name} ({what})"
