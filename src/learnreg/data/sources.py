"""Synthetic training data by name: known-warp pairs of real images for ``learnreg train``.

``data.synthetic`` in a training config names a *kind* and its options::

    data:
      synthetic: {kind: homography, images: photos, length: 4096, seed: 1}

A kind is a builder ``(options, preprocessor) -> (train, val)`` registered with
:func:`register_source` in the module that defines its pairs (:mod:`learnreg.data.synthetic`,
:mod:`learnreg.data.random_warps`, :mod:`learnreg.data.perturb`). Every dataset it returns
has what the trainer needs: ``grid`` (the network grid of its items), ``preprocessor`` (how a
new image is put on that grid at prediction time, saved in checkpoints), ``__len__`` and
``__getitem__`` items for :func:`~learnreg.data.datasets.collate_pairs` (with ``target``
for supervised methods).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from learnreg.core.errors import InputError
from learnreg.core.options import check_option
from learnreg.data.preprocess import Preprocessor

__all__ = ["register_source", "synthetic_datasets", "source_kinds"]

Builder = Callable[[dict, Preprocessor], tuple[Any, Any]]
_SOURCES: dict[str, Builder] = {}
_MODULES = (
    "learnreg.data.synthetic",
    "learnreg.data.random_warps",
    "learnreg.data.perturb",
    "learnreg.data.reference_fields",
    "learnreg.data.lddmm_momenta",
    "learnreg.data.modalities",
    "learnreg.data.interest_points",
    "learnreg.data.drr_pairs",
)


def register_source(kind: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``data.synthetic: {kind: <kind>, ...}`` call the builder."""

    def deco(builder: Builder) -> Builder:
        if kind in _SOURCES:
            raise ValueError(f"synthetic source {kind!r} is already registered")
        _SOURCES[kind] = builder
        return builder

    return deco


def source_kinds() -> list[str]:
    """The registered kinds."""
    for module in _MODULES:
        importlib.import_module(module)
    return sorted(_SOURCES)


def synthetic_datasets(options: dict, preprocessor: Preprocessor) -> tuple[Any, Any]:
    """``(train, val)`` datasets of ``options`` (``kind`` plus the kind's own keys; ``val``
    may be None). Unknown kinds or keys raise :class:`InputError`."""
    if not isinstance(options, dict) or "kind" not in options:
        raise InputError(f"config data.synthetic needs a kind (one of {', '.join(source_kinds())})")
    kind = check_option("config data.synthetic.kind", options["kind"], source_kinds(), InputError)
    rest = {k: v for k, v in options.items() if k != "kind"}
    return _SOURCES[kind](rest, preprocessor)
