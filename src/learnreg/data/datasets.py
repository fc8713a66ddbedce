"""Datasets of registration pairs, preprocessed once onto a network grid and cached in memory.

- :func:`atlas_pairs`: fixed atlas, moving each subject (atlas-to-subject);
- :func:`subject_pairs`: every ordered pair of distinct subjects (subject-to-subject); a
  shuffling sampler turns them into random pairs;
- :func:`folder_subjects` / :func:`pairs_from_csv`: where the files come from — an image
  folder with an optional label folder holding files of the same names, or a CSV with columns
  ``fixed, moving[, fixed_labels, moving_labels]`` (relative paths are relative to the CSV).

:class:`PairDataset` resamples every image (and label map) once onto one network grid (by
default derived from the first pair's fixed image, e.g. the atlas) and keeps it; items are
dicts that :func:`collate_pairs` stacks into a ``RegistrationBatch``. Images are assumed to
be roughly aligned in world space (as after affine pre-alignment), so one grid serves all.
"""

from __future__ import annotations

import csv
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.data.preprocess import Preprocessor
from learnreg.io.images import IMAGE_EXTENSIONS, extension, read_image, read_labels
from learnreg.spatial.base import SpatialTransform

__all__ = [
    "Subject",
    "PairSpec",
    "PairDataset",
    "folder_subjects",
    "atlas_pairs",
    "subject_pairs",
    "pairs_from_csv",
    "collate_pairs",
]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Subject:
    """An image and its optional label map."""

    image: Path
    labels: Path | None = None

    @property
    def name(self) -> str:
        n = self.image.name
        ext = extension(n)
        return n[: -len(ext)] if ext else n


@dataclass(frozen=True)
class PairSpec:
    """A fixed and a moving subject."""

    fixed: Subject
    moving: Subject


def _stem(path: Path) -> str:
    ext = extension(path)
    return path.name[: -len(ext)] if ext else path.name


def folder_subjects(
    images: PathLike, labels: PathLike | None = None, names: Sequence[str] | None = None
) -> dict[str, Subject]:
    """Subjects of an image folder (and a label folder with files of the same names).

    ``names`` selects subjects by file name with or without extension (``"S11"`` or
    ``"S11.nii.gz"``); default all images, sorted. A missing label file raises.
    """
    img_dir = Path(images)
    if not img_dir.is_dir():
        raise InputError(f"{img_dir}: image folder not found")
    files = {
        _stem(f): f
        for f in sorted(img_dir.iterdir())
        if f.is_file() and extension(f) in IMAGE_EXTENSIONS
    }
    if names is None:
        chosen = list(files)
    else:
        chosen = [_stem(Path(n)) for n in names]
        missing = [n for n in chosen if n not in files]
        if missing:
            raise InputError(f"{img_dir}: no image for subjects {missing}")
    if not chosen:
        raise InputError(f"{img_dir}: no images found")
    out = {}
    for n in chosen:
        lab = None
        if labels is not None:
            lab = Path(labels) / files[n].name
            if not lab.is_file():
                raise InputError(f"{lab}: label map not found for image {files[n]}")
        out[n] = Subject(files[n], lab)
    return out


def atlas_pairs(atlas: Subject, subjects: Sequence[Subject]) -> list[PairSpec]:
    """Atlas-to-subject: the atlas is fixed, each subject moving (the atlas itself skipped)."""
    return [PairSpec(atlas, s) for s in subjects if s.image != atlas.image]


def subject_pairs(subjects: Sequence[Subject]) -> list[PairSpec]:
    """Subject-to-subject: every ordered pair of distinct subjects."""
    return [PairSpec(f, m) for f, m in itertools.permutations(subjects, 2)]


def pairs_from_csv(path: PathLike) -> list[PairSpec]:
    """Pairs from a CSV with a header ``fixed, moving[, fixed_labels, moving_labels]``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: CSV of pairs not found")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "fixed" not in cols or "moving" not in cols:
            raise InputError(
                f"{path}: CSV needs columns fixed, moving[, fixed_labels, moving_labels]; "
                f"got {cols}"
            )
        unknown = set(cols) - {"fixed", "moving", "fixed_labels", "moving_labels"}
        if unknown:
            raise InputError(f"{path}: unknown CSV columns {sorted(unknown)}")
        pairs = []
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}

            def p(key: str, row: dict = row) -> Path | None:
                v = row.get(key, "")
                if not v:
                    return None
                q = Path(v)
                return q if q.is_absolute() else path.parent / q

            if p("fixed") is None or p("moving") is None:
                raise InputError(f"{path}: line {reader.line_num} lacks fixed or moving")
            pairs.append(
                PairSpec(
                    Subject(p("fixed"), p("fixed_labels")), Subject(p("moving"), p("moving_labels"))
                )
            )
    if not pairs:
        raise InputError(f"{path}: CSV holds no pairs")
    return pairs


class PairDataset(Dataset):
    """Registration pairs on one network grid; every file is read and preprocessed once.

    Args:
        pairs: the pairs (:func:`atlas_pairs`, :func:`subject_pairs`, :func:`pairs_from_csv`).
        preprocessor: how images are put on the network grid.
        grid: the network grid; default ``preprocessor.grid_for(first fixed image)``.
        preload: read and preprocess every file now (else on first use).
        prealign: optional ``(fixed, moving) → transform`` (fixed world → moving world, e.g.
            a classical affine registration); each moving image and label map is resampled
            through its pair's transform, so the network sees pre-aligned pairs, as
            prediction after affine alignment does. The matrices are kept in
            :attr:`prealignments` (``"fixed/moving"`` → transform).

    Items are dicts with ``fixed``, ``moving`` (``(1, *S)`` float32), ``fixed_labels``,
    ``moving_labels`` (``(1, *S)`` int64, or absent), ``index`` and ``names``.
    """

    def __init__(
        self,
        pairs: Sequence[PairSpec],
        preprocessor: Preprocessor | None = None,
        grid: Grid | None = None,
        preload: bool = True,
        prealign: Callable[[Image, Image], SpatialTransform] | None = None,
    ) -> None:
        if not pairs:
            raise InputError("PairDataset: no pairs")
        self.pairs = list(pairs)
        self.preprocessor = preprocessor or Preprocessor()
        self.prealign = prealign
        self.prealignments: dict[str, SpatialTransform] = {}
        self._cache: dict[tuple[Path, bool, Path | None], torch.Tensor] = {}
        if grid is None:  # the reference is read once: for the grid and for the cache
            ref_path = self.pairs[0].fixed.image
            ref = read_image(ref_path)
            grid = self.preprocessor.grid_for(ref)
            key = (ref_path, False, None)
            self._cache[key] = self.preprocessor.image(ref, grid).data.contiguous()
        self.grid = grid
        if preload:
            for i in range(len(self.pairs)):
                self[i]

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def has_labels(self) -> bool:
        return all(p.fixed.labels is not None and p.moving.labels is not None for p in self.pairs)

    def _read(self, path: Path) -> Image:
        img = read_image(path)
        if img.ndim != self.grid.ndim:
            raise InputError(f"{path}: {img.ndim}D image in a dataset of {self.grid.ndim}D images")
        return img

    def _transform(self, pair: PairSpec) -> SpatialTransform | None:
        """The pre-alignment of ``pair`` (computed once), or None without ``prealign``."""
        if self.prealign is None:
            return None
        key = f"{pair.fixed.name}/{pair.moving.name}"
        if key not in self.prealignments:
            fixed, moving = self._read(pair.fixed.image), self._read(pair.moving.image)
            self.prealignments[key] = self.prealign(fixed, moving)
        return self.prealignments[key]

    def _load(self, path: Path, labels: bool, pair: PairSpec | None = None) -> torch.Tensor:
        """``path`` on the network grid; a moving file of ``pair`` goes through its
        pre-alignment (cached per fixed image)."""
        transform = self._transform(pair) if pair is not None else None
        key = (path, labels, pair.fixed.image if transform is not None else None)
        if key not in self._cache:
            if labels:
                t = self.preprocessor.labels(read_labels(path), self.grid, transform).data
            else:
                t = self.preprocessor.image(self._read(path), self.grid, transform).data
            self._cache[key] = t.contiguous()
        return self._cache[key]

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        item = {
            "fixed": self._load(pair.fixed.image, False),
            "moving": self._load(pair.moving.image, False, pair),
            "index": int(index),
            "names": (pair.fixed.name, pair.moving.name),
        }
        if pair.fixed.labels is not None and pair.moving.labels is not None:
            item["fixed_labels"] = self._load(pair.fixed.labels, True)
            item["moving_labels"] = self._load(pair.moving.labels, True, pair)
        return item


def _batch_type():
    from learnreg.methods.base import RegistrationBatch

    return RegistrationBatch


def collate_pairs(items: Sequence[dict]):
    """Stack dataset items into a ``RegistrationBatch`` (labels and ``target`` only if every
    item has them)."""
    if not items:
        raise ValueError("collate_pairs: empty batch")
    stack = {k: torch.stack([it[k] for it in items]) for k in ("fixed", "moving")}
    for k in ("fixed_labels", "moving_labels", "target"):
        stack[k] = torch.stack([it[k] for it in items]) if all(k in it for it in items) else None
    return _batch_type()(**stack)
