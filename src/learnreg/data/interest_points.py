"""Anatomical interest points of LPBA40 subjects: the training landmarks of Sergeev et al.'s
point detectors (SPIE Medical Imaging 2012).

Sergeev et al. trained one detector per interest point from images on which that point had been
located. Here the points are defined once, on the atlas (S01): the centroid (world mm, from
the 1 mm label map) of each labelled LPBA40 structure (56 by default, or the ``structures``
given). They are carried to every training subject by learnreg's classical registration of
the subject's image to the atlas's, both on the network grid
(:func:`learnreg.optimize.classical.register`, preset ``default`` — rigid → affine → SVF,
LNCC — unless ``registration`` names another preset): the result maps atlas world points to
subject world points, so a subject's landmark ``k`` is the image of the atlas's landmark
``k``. Only the atlas's label map is used (to define the points); a subject's own label map
enters only the logged check of how far each mapped point lies from that subject's own
structure centroid (``mapped_error_mm``, next to ``identity_error_mm`` for the unmapped atlas
point). Positions are computed once per (atlas, subject, grid, registration, structures) and
stored (:class:`~learnreg.data.reference_fields.ReferencePairs`).

``data.synthetic: {kind: interest-points, ...}`` builds atlas → subject pairs for
``learnreg train`` (:func:`interest_point_source`); items carry ``target`` ``(2, K, D)``: the
K landmarks in index coordinates of the network grid in the atlas (0) and the subject (1).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import torch

from learnreg.core.errors import InputError
from learnreg.core.image import Image
from learnreg.core.options import check_option
from learnreg.data.preprocess import Preprocessor
from learnreg.data.reference_fields import SOURCE_DEFAULTS, ReferencePairs, reference_source
from learnreg.data.sources import register_source
from learnreg.data.synthetic import source_options
from learnreg.optimize.classical import register
from learnreg.optimize.config import PRESETS, ClassicalConfig, preset

__all__ = ["structure_centroids", "LandmarkPairs", "interest_point_source"]


def structure_centroids(
    labels: Image, structures: Sequence[int] | None = None
) -> tuple[list[int], torch.Tensor]:
    """``(values, points)``: the label values (default: every nonzero value present, sorted)
    and the world centroid ``(K, D)`` float64 of each (NaN for a value absent from
    ``labels``)."""
    lab = labels.data
    if lab.is_floating_point():
        lab = lab.round()
    lab = lab.reshape(-1).long()
    if structures is None:
        values = sorted(int(v) for v in torch.unique(lab).tolist() if v != 0)
        if not values:
            raise ValueError(f"{labels.name}: the label map has no structures")
    else:
        values = [int(v) for v in structures]
        if not values or 0 in values:
            raise ValueError(f"structures must be nonzero label values, got {list(structures)}")
    d = labels.ndim
    idx = labels.grid.index_points(torch.float64).reshape(-1, d)
    size = max(int(lab.max()), max(values)) + 1
    lab = lab.clamp(min=0)
    counts = torch.bincount(lab, minlength=size).double()
    sums = torch.stack([torch.bincount(lab, idx[:, a], minlength=size) for a in range(d)], -1)
    v = torch.tensor(values)
    centre = sums[v] / counts[v, None]  # NaN where absent
    return values, labels.grid.index_to_world(centre)


class LandmarkPairs(ReferencePairs):
    """:class:`ReferencePairs` whose reference is the atlas's structure centroids and their
    images in the subject under the classical registration (module docstring).

    Extra argument: ``structures`` (label values; default every atlas structure). Items'
    ``target``: ``(2, K, D)`` float32 index coordinates of the network grid, atlas then
    subject. :attr:`landmarks` is the atlas's ``(K, D)`` world points, :attr:`structures`
    their label values.
    """

    what = "interest points"

    def __init__(self, *args, structures: Sequence[int] | None = None, **kwargs) -> None:
        labels, atlas = args[1], args[2]
        if atlas not in labels:
            raise ValueError(f"LandmarkPairs: no label map for the atlas {atlas}")
        self.structures, self.landmarks = structure_centroids(labels[atlas], structures)
        if not torch.isfinite(self.landmarks).all():
            absent = [
                s for s, p in zip(self.structures, self.landmarks, strict=True) if p.isnan().any()
            ]
            raise ValueError(f"LandmarkPairs: structures {absent} are not in the atlas {atlas}")
        super().__init__(*args, **kwargs)

    def default_config(self) -> ClassicalConfig:
        return preset("default")

    def _key(self, subject: str) -> dict:
        return {**super()._key(subject), "structures": self.structures}

    def compute(self, subject: str, labels: dict[str, Image]) -> tuple[torch.Tensor, dict]:
        t0 = time.perf_counter()
        result = register(self.grid_images[self.atlas], self.grid_images[subject], self.config)
        mapped = result.map_points(self.landmarks.float()).double()
        target = torch.stack(
            [self.grid.world_to_index(self.landmarks), self.grid.world_to_index(mapped)]
        ).float()
        _, own = structure_centroids(labels[subject], self.structures)
        ok = torch.isfinite(own).all(1)

        def err(p: torch.Tensor) -> float:
            return float(torch.linalg.norm(p[ok] - own[ok], dim=1).mean())

        info = {
            "mapped_error_mm": err(mapped),
            "identity_error_mm": err(self.landmarks),
            "seconds": time.perf_counter() - t0,
        }
        return target.contiguous(), info


_DEFAULTS = {**SOURCE_DEFAULTS, "registration": "default", "structures": None}


@register_source("interest-points")
def interest_point_source(
    options: dict, preprocessor: Preprocessor
) -> tuple[LandmarkPairs, LandmarkPairs | None]:
    """``data.synthetic: {kind: interest-points, ...}``: LPBA40 atlas → subject pairs with
    landmark positions in both (:class:`LandmarkPairs`).

    Keys (defaults): those of :func:`~learnreg.data.reference_fields.reference_source`
    (``folder``, ``atlas`` S01, ``subjects`` S11–S34, ``val_subjects`` S35–S40, ``cache``,
    ``length``), ``registration`` (the classical preset that maps the atlas's points to each
    subject; ``default``) and ``structures`` (label values; default all of the atlas's).
    Validation pairs carry label maps (Dice) and no landmarks.
    """
    o = source_options("interest-points", options, _DEFAULTS)
    name = check_option(
        "config data.synthetic.registration", o["registration"], sorted(PRESETS), InputError
    )
    structures = o["structures"]
    if structures is not None and (
        isinstance(structures, str | int) or not all(isinstance(s, int) for s in structures)
    ):
        raise InputError(
            f"config data.synthetic.structures must be a list of label values, got {structures!r}"
        )
    pairs = functools.partial(LandmarkPairs, structures=structures)
    return reference_source("interest-points", o, preprocessor, pairs, preset(name))  # type: ignore[arg-type]
