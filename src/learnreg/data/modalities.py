"""Same-subject images in two modalities: the paired data of intra-modality supervision.

Cao et al. (2018) train an inter-modality network (CT → MR) whose loss never compares the two
modalities: every training subject has both images, pre-aligned, so the warped moving image is
compared with the fixed subject's image *of the moving image's modality* (and, "dual", the
moving subject's image of the fixed modality, warped, with the fixed image). That needs
same-subject, aligned images in two modalities.

What exists here and in package registries (checked for this module): ``../shared/data`` has
single-modality LPBA40 T1 volumes, and MR–TRUS prostate pairs that are *not* aligned to each
other (aligning them is the registration task itself); PyPI's ``nilearn`` ships the ICBM152
T1 template with tissue probability maps (not a second modality), ``scikit-image`` and
``dipy`` ship single-modality slices (dipy's T1/b0 pair is downloaded from a web server at run
time, not shipped), ``antspyx`` the same T1 images and templates we have. No registry ships an
aligned same-subject multimodal brain pair, so the pair is built from what we have: each
LPBA40 T1 volume gets a **T2-like** twin by :func:`t2_like` — a voxelwise, non-monotonic
contrast (background stays dark while CSF, the darkest tissue in T1, becomes the brightest;
grey matter stays in between; white matter turns dark) under a smooth multiplicative bias field
of its own (:func:`bias_field`), made at 1 mm and then resampled like any input. The twin is
aligned to its T1 by construction — exactly the paired data the method needs — but its
contrast is a model of T2, not an acquisition: nothing here shows how a network trained on it
fares on real T2 images.

``data.synthetic: {kind: modality-pairs, ...}`` builds atlas → subject pairs for
``learnreg train`` (:func:`modality_pair_source`): fixed = the atlas in one modality, moving =
a subject in the other, ``target`` = the counterparts ``(fixed in the moving's modality,
moving in the fixed's modality)``; label maps for validation Dice only.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.core.options import check_option
from learnreg.data.preprocess import Preprocessor
from learnreg.data.random_warps import (
    lpba_atlas_source,
    prediction_preprocessor,
    read_lpba_labelled,
)
from learnreg.data.sources import register_source
from learnreg.data.synthetic import source_options
from learnreg.spatial.sampling import resample

__all__ = [
    "MODALITIES",
    "t2_like",
    "bias_field",
    "second_modality",
    "ModalityPairs",
    "modality_pair_source",
]

MODALITIES = ("t1", "t2-like")
"""The modalities of :class:`ModalityPairs`: LPBA40's T1 as stored, and its :func:`t2_like`
twin."""


def t2_like(t1: torch.Tensor, threshold: float = 0.1, contrast: float = 0.8) -> torch.Tensor:
    """A T2-like contrast of a skull-stripped T1 image with intensities in ``[0, 1]``.

    ``inside · (1 − contrast · t1)`` with ``inside = clamp(t1 / threshold, 0, 1)``: the
    background (0) stays 0, CSF (T1 ≈ 0.1–0.35 in LPBA40) maps to ≈ 0.7–0.9, grey matter
    (≈ 0.5–0.7) to ≈ 0.45–0.6, white matter (≈ 0.7–0.9) to ≈ 0.3–0.45. Non-monotonic in
    ``t1``, so no global linear relation (what NCC assumes) links the two images.
    """
    if not 0 < threshold < 1 or not 0 < contrast <= 1:
        raise ValueError("t2_like: need 0 < threshold < 1 and 0 < contrast <= 1")
    t1 = t1.clamp(0, 1)
    return (t1 / threshold).clamp(max=1) * (1 - contrast * t1)


def bias_field(
    shape: Sequence[int], seed: int, strength: float = 0.15, nodes: int = 4
) -> torch.Tensor:
    """A smooth multiplicative bias field ``exp(strength · b)`` of ``shape``: ``b`` is
    standard normal on a ``nodes``-per-axis lattice, interpolated (linear) over the image."""
    g = torch.Generator().manual_seed(int(seed))
    ndim = len(shape)
    coarse = torch.randn((1, 1, *(nodes,) * ndim), generator=g, dtype=torch.float64)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[ndim]
    b = F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)[0, 0]
    return torch.exp(strength * b).float()


def second_modality(image: Image, seed: int = 0, strength: float = 0.15) -> Image:
    """The T2-like twin of a T1 :class:`~learnreg.core.image.Image` on the same grid:
    :func:`t2_like` under a :func:`bias_field` seeded by ``seed`` and the image's name (the same
    twin for the same subject in every run)."""
    key = zlib.crc32(f"{seed}:{image.name}".encode())
    data = t2_like(image.data.float()) * bias_field(image.grid.shape, key, strength)
    return Image(data, image.grid, image.name)


class ModalityPairs(Dataset):
    """Atlas → subject pairs across two modalities, with each image's same-subject counterpart.

    Args:
        images: ``modality → name → Image`` on the network grid, for both modalities.
        labels: ``name → Image`` label maps (any resolution; resampled nearest neighbour).
        atlas: the fixed subject; ``subjects``: the moving ones.
        moving_modality: the moving images' modality; the fixed images are in the other one.
        grid, preprocessor: the network grid and how prediction puts a new image on it.
        length: items (subject ``i % len(subjects)``).

    Items: ``fixed`` (atlas, fixed modality), ``moving`` (subject, moving modality) ``(1, *S)``;
    ``target`` ``(2, *S)``: channel 0 the atlas in the moving modality, channel 1 the subject
    in the fixed modality; ``fixed_labels``, ``moving_labels`` ``(1, *S)`` int64; ``index``,
    ``names``.
    """

    has_labels = True

    def __init__(
        self,
        images: dict[str, dict[str, Image]],
        labels: dict[str, Image],
        atlas: str,
        subjects: Sequence[str],
        moving_modality: str,
        grid: Grid,
        preprocessor: Preprocessor,
        length: int | None = None,
    ) -> None:
        check_option("moving_modality", moving_modality, MODALITIES)
        if set(images) != set(MODALITIES):
            raise ValueError(f"ModalityPairs: images need the modalities {MODALITIES}")
        if not subjects:
            raise ValueError("ModalityPairs: no subjects")
        names = (atlas, *subjects)
        missing = [n for n in names if n not in labels or any(n not in m for m in images.values())]
        if missing:
            raise ValueError(f"ModalityPairs: no image in both modalities or labels for {missing}")
        self.atlas, self.subjects = atlas, list(subjects)
        self.moving_modality = moving_modality
        self.fixed_modality = next(m for m in MODALITIES if m != moving_modality)
        self.grid, self.preprocessor = grid, preprocessor
        self.length = len(self.subjects) if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"ModalityPairs: length must be >= 1, got {length}")
        self.images = {m: {n: images[m][n].data.float() for n in names} for m in MODALITIES}
        self.labels = {n: resample(labels[n], grid, mode="nearest").data.long() for n in names}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        name = self.subjects[index % len(self.subjects)]
        fixed_m, moving_m = self.images[self.fixed_modality], self.images[self.moving_modality]
        return {
            "fixed": fixed_m[self.atlas],
            "moving": moving_m[name],
            "target": torch.cat([moving_m[self.atlas], fixed_m[name]]),
            "fixed_labels": self.labels[self.atlas],
            "moving_labels": self.labels[name],
            "index": int(index),
            "names": (self.atlas, name),
        }


_DEFAULTS = {
    "folder": None,
    "atlas": "S01",
    "subjects": None,
    "val_subjects": None,
    "moving_modality": "t1",
    "length": None,
    "seed": 0,
}


@register_source("modality-pairs")
def modality_pair_source(
    options: dict, preprocessor: Preprocessor
) -> tuple[ModalityPairs, ModalityPairs | None]:
    """``data.synthetic: {kind: modality-pairs, ...}``: LPBA40 atlas → subject pairs, the
    atlas in one modality and the subject in the other (:class:`ModalityPairs`).

    Keys (defaults): ``folder`` (the ``lpba40`` folder), ``atlas`` (S01), ``subjects`` /
    ``val_subjects`` (:data:`~learnreg.data.random_warps.LPBA_TRAIN` /
    :data:`~learnreg.data.random_warps.LPBA_HELDOUT`; ``[]``: no validation),
    ``moving_modality`` (``t1``; the fixed images are then ``t2-like``), ``length`` (training
    items; default the number of subjects), ``seed`` (of the bias fields). The network grid is
    ``data.shape`` / ``data.spacing`` over the atlas's field of view.
    """
    o = source_options("modality-pairs", options, _DEFAULTS)
    root, atlas, subjects, held, pre = lpba_atlas_source("modality-pairs", o, preprocessor)
    try:
        raw, labels = read_lpba_labelled(root, [atlas, *subjects, *held])
        grid = pre.grid_for(raw[atlas])
        twins = {n: second_modality(im, int(o["seed"])) for n, im in raw.items()}
        images = {
            "t1": {n: pre.image(im, grid) for n, im in raw.items()},
            "t2-like": {n: pre.image(im, grid) for n, im in twins.items()},
        }
        pre = prediction_preprocessor(pre, grid)
        moving = str(o["moving_modality"])
        length = None if o["length"] is None else int(o["length"])
        train = ModalityPairs(images, labels, atlas, subjects, moving, grid, pre, length)
        val = ModalityPairs(images, labels, atlas, held, moving, grid, pre) if held else None
        return train, val
    except ValueError as e:
        raise InputError(f"config data.synthetic (modality-pairs): {e}") from None
