"""Registration pairs: one pair type and one CSV schema for training and evaluation, and
datasets of pairs preprocessed once onto a network grid.

- :class:`Pair`: a named registration task — fixed and moving image files and, optionally,
  their label maps and landmark CSVs. Training (:class:`PairDataset`) and evaluation
  (:mod:`learnreg.runner`) use the same pairs.
- :func:`pairs_from_csv`: pairs from a CSV with a header ``fixed, moving`` and optionally
  ``fixed_labels, moving_labels, fixed_points, moving_points, name`` (:data:`CSV_COLUMNS`;
  relative paths are relative to the CSV, empty cells mean "not given").
- :class:`Subject` / :func:`folder_subjects`: the images of a folder (with a label folder
  holding files of the same names); :func:`atlas_pairs` (fixed atlas, moving each subject),
  :func:`subject_pairs` (every ordered pair of distinct subjects; a shuffling sampler turns
  them into random pairs), :func:`atlas_folder_pairs` (both at once, as ``learnreg evaluate
  --atlas --moving-dir`` asks).
- :func:`load_pair`: a pair's files read and checked (:class:`PairImages`), for scoring.

:class:`PairDataset` resamples every image (and label map) once onto one network grid (by
default derived from the first pair's fixed image, e.g. the atlas) and keeps it; items are
dicts that :func:`collate_pairs` stacks into a ``RegistrationBatch``. Images are assumed to
be roughly aligned in world space (as after affine pre-alignment), so one grid serves all.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.data.preprocess import Preprocessor
from learnreg.io.images import IMAGE_EXTENSIONS, extension, read_image, read_labels
from learnreg.io.points import read_csv_rows, read_points
from learnreg.spatial.base import SpatialTransform

__all__ = [
    "CSV_COLUMNS",
    "Pair",
    "PairImages",
    "Subject",
    "PairDataset",
    "folder_subjects",
    "atlas_pairs",
    "atlas_folder_pairs",
    "subject_pairs",
    "pairs_from_csv",
    "load_pair",
    "collate_pairs",
    "safe_name",
]

PathLike = str | os.PathLike

_PATH_FIELDS = (
    "fixed", "moving", "fixed_labels", "moving_labels", "fixed_points", "moving_points"
)  # fmt: skip
CSV_COLUMNS: tuple[str, ...] = (*_PATH_FIELDS, "name")
"""The columns of a CSV of pairs: ``fixed`` and ``moving`` required, the others optional."""
_SCHEMA = "fixed, moving[, fixed_labels, moving_labels, fixed_points, moving_points, name]"


def _stem(path: PathLike) -> str:
    """File name without its image extension (``.nii.gz`` whole)."""
    name = Path(path).name
    ext = extension(name)
    return name[: -len(ext)] if ext else name


def safe_name(name: str) -> str:
    """``name`` as a file-system-safe folder name (what a pair's records are stored under)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-") or "pair"


def _path(p: PathLike | None) -> Path | None:
    return None if p is None else Path(p)


# ---------------------------------------------------------------------------- the pair
@dataclass(frozen=True)
class Subject:
    """An image and its optional label map and landmarks (CSV ``x,y[,z]``, RAS mm)."""

    image: Path
    labels: Path | None = None
    points: Path | None = None

    def __post_init__(self) -> None:
        for f in ("image", "labels", "points"):
            object.__setattr__(self, f, _path(getattr(self, f)))

    @property
    def name(self) -> str:
        return _stem(self.image)


@dataclass(frozen=True)
class Pair:
    """One registration task: a name, the image files and, optionally, labels and landmarks.

    ``name`` identifies the pair (evaluation stores its records under it; it must be unique
    among the pairs evaluated together). ``fixed_points`` / ``moving_points`` are CSVs
    (``x,y[,z]``, RAS mm) of corresponding landmarks, row ``i`` of one matching row ``i`` of
    the other. Training uses the images and labels; evaluation all of them.
    """

    name: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_points: Path | None = None
    moving_points: Path | None = None

    def __post_init__(self) -> None:
        for f in _PATH_FIELDS:
            object.__setattr__(self, f, _path(getattr(self, f)))

    @classmethod
    def of(cls, fixed: Subject, moving: Subject, name: str | None = None) -> Pair:
        """The pair of two subjects, named ``<moving>_to_<fixed>`` by default."""
        return cls(
            name=safe_name(name or f"{moving.name}_to_{fixed.name}"),
            fixed=fixed.image,
            moving=moving.image,
            fixed_labels=fixed.labels,
            moving_labels=moving.labels,
            fixed_points=fixed.points,
            moving_points=moving.points,
        )

    @property
    def fixed_subject(self) -> Subject:
        return Subject(self.fixed, self.fixed_labels, self.fixed_points)

    @property
    def moving_subject(self) -> Subject:
        return Subject(self.moving, self.moving_labels, self.moving_points)

    @property
    def has_labels(self) -> bool:
        return self.fixed_labels is not None and self.moving_labels is not None

    @property
    def has_points(self) -> bool:
        return self.fixed_points is not None and self.moving_points is not None

    def to_dict(self) -> dict:
        return {k: (None if v is None else str(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Pair:
        return cls(name=d["name"], **{k: d.get(k) for k in _PATH_FIELDS})


# ---------------------------------------------------------------------------- pair lists
def folder_subjects(
    images: PathLike,
    labels: PathLike | None = None,
    names: Sequence[str] | None = None,
    *,
    pattern: str | None = None,
    require_labels: bool = True,
) -> dict[str, Subject]:
    """Subjects of an image folder (and a label folder with files of the same names).

    ``names`` selects subjects by file name with or without extension (``"S11"`` or
    ``"S11.nii.gz"``); default all images (files with an image extension, or matching the
    glob ``pattern``), sorted. A missing label file raises, unless ``require_labels`` is
    False: then the subject keeps the path of the missing file, so that scoring it reports
    the missing file instead of silently scoring without labels.
    """
    img_dir = Path(images)
    if not img_dir.is_dir():
        raise InputError(f"{img_dir}: image folder not found")
    if pattern is None:
        found = (f for f in img_dir.iterdir() if f.is_file() and extension(f) in IMAGE_EXTENSIONS)
    else:
        found = (f for f in img_dir.glob(pattern) if f.is_file())
    files = {_stem(f): f for f in sorted(found)}
    if names is None:
        chosen = list(files)
    else:
        chosen = [_stem(n) for n in names]
        missing = [n for n in chosen if n not in files]
        if missing:
            raise InputError(f"{img_dir}: no image for subjects {missing}")
    if not chosen:
        what = f"images matching {pattern!r}" if pattern is not None else "images found"
        raise InputError(f"{img_dir}: no {what}")
    out = {}
    for n in chosen:
        lab = None
        if labels is not None:
            lab = Path(labels) / files[n].name
            if require_labels and not lab.is_file():
                raise InputError(f"{lab}: label map not found for image {files[n]}")
        out[n] = Subject(files[n], lab)
    return out


def _same_file(a: Path, b: Path) -> bool:
    return a == b or a.resolve() == b.resolve()


def atlas_pairs(atlas: Subject, subjects: Sequence[Subject]) -> list[Pair]:
    """Atlas-to-subject: the atlas is fixed, each subject moving (the atlas itself skipped);
    each pair is named after its subject."""
    return [
        Pair.of(atlas, s, name=s.name) for s in subjects if not _same_file(s.image, atlas.image)
    ]


def atlas_folder_pairs(
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
    subjects = [
        s
        for s in folder_subjects(
            folder, labels_folder, pattern=pattern, require_labels=False
        ).values()
        if not _same_file(s.image, atlas)
    ]
    if not subjects:
        raise InputError(f"{folder}: no images matching {pattern!r}")
    fixed = Subject(atlas, _path(atlas_labels) if labels_folder is not None else None)
    return atlas_pairs(fixed, subjects)


def subject_pairs(subjects: Sequence[Subject]) -> list[Pair]:
    """Subject-to-subject: every ordered pair of distinct subjects (``<moving>_to_<fixed>``)."""
    return [Pair.of(f, m) for f, m in itertools.permutations(subjects, 2)]


def pairs_from_csv(path: PathLike, must_exist: bool = False) -> list[Pair]:
    """Pairs from a CSV with columns ``fixed, moving`` and optionally ``fixed_labels,
    moving_labels, fixed_points, moving_points, name`` (:data:`CSV_COLUMNS`, any order);
    relative paths are relative to the CSV.

    Empty cells mean "not given"; labels and landmarks come in pairs (both sides or neither).
    The column ``name`` may be called ``id``. Names default to ``<moving>_to_<fixed>`` and
    must be unique. ``must_exist``: every file named must exist (else an error naming the
    row, the column and the file).
    """
    path = Path(path)
    if not path.is_file():
        problem = "not a file" if path.exists() else "not found"
        raise InputError(f"{path}: CSV of pairs {problem}")
    rows = read_csv_rows(path, _SCHEMA)
    header = [h.strip().lower() for h in rows[0]]
    header = ["name" if h == "id" else h for h in header]  # ``id``: another word for it
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        raise InputError(
            f"{path}: unknown column(s) {', '.join(unknown)}; expected columns {_SCHEMA}"
        )
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise InputError(f"{path}: column(s) {', '.join(repeated)} appear more than once")
    missing = [c for c in ("fixed", "moving") if c not in header]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}; expected columns {_SCHEMA}, "
            f"header is {','.join(header)!r}"
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
        for k, f in paths.items():
            if must_exist and not f.exists():
                where = "" if str(f) == cells[k] else f" (looked for {f})"
                raise InputError(f"{path}: row {n}: {k} {cells[k]}: file not found{where}")
        name = safe_name(
            cells.get("name") or f"{_stem(paths['moving'])}_to_{_stem(paths['fixed'])}"
        )
        if name in seen:
            raise InputError(
                f"{path}: row {n}: pair name {name!r} repeats row {seen[name]}; add a name column"
            )
        seen[name] = n
        pairs.append(Pair(name=name, **paths))
    return pairs


# ---------------------------------------------------------------------------- reading a pair
@dataclass
class PairImages:
    """A pair's files read: images, label maps (``None`` when not given) and landmarks
    ``(P, D)`` (RAS mm)."""

    fixed: Image
    moving: Image
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    fixed_points: torch.Tensor | None = None
    moving_points: torch.Tensor | None = None


def _fmt_labels(labels: list[int], n: int = 12) -> str:
    s = ", ".join(map(str, labels[:n]))
    return s + (f", … ({len(labels)} in all)" if len(labels) > n else "")


def load_pair(pair: Pair) -> PairImages:
    """Read and check a pair's files: one-channel images of one dimensionality, label maps
    on their images' grids with the same set of labels, landmark sets of equal, nonzero
    size. Raises :class:`InputError` starting with ``pair <name>:``."""

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
        inp = PairImages(fixed, moving)
        if pair.has_labels:
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
        if pair.has_points:
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


# ---------------------------------------------------------------------------- datasets
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
        progress: called ``(done, total, pair)`` after each pair is preloaded.

    Items are dicts with ``fixed``, ``moving`` (``(1, *S)`` float32), ``fixed_labels``,
    ``moving_labels`` (``(1, *S)`` int64, or absent), ``index`` and ``names`` (the fixed and
    moving subjects' names). Landmarks of the pairs are not used in training.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        preprocessor: Preprocessor | None = None,
        grid: Grid | None = None,
        preload: bool = True,
        prealign: Callable[[Image, Image], SpatialTransform] | None = None,
        progress: Callable[[int, int, str], None] | None = None,
    ) -> None:
        if not pairs:
            raise InputError("PairDataset: no pairs")
        self.pairs = list(pairs)
        self.preprocessor = preprocessor or Preprocessor()
        self.prealign = prealign
        self.prealignments: dict[str, SpatialTransform] = {}
        self._cache: dict[tuple[Path, bool, Path | None], torch.Tensor] = {}
        if grid is None:  # the reference is read once: for the grid and for the cache
            ref_path = self.pairs[0].fixed
            ref = read_image(ref_path)
            grid = self.preprocessor.grid_for(ref)
            key = (ref_path, False, None)
            self._cache[key] = self.preprocessor.image(ref, grid).data.contiguous()
        self.grid = grid
        if preload:
            for i in range(len(self.pairs)):
                t0 = time.perf_counter()
                self[i]
                if progress is not None:
                    p = self.pairs[i]
                    what = f"{p.moving_subject.name} → {p.fixed_subject.name}"
                    progress(i + 1, len(self.pairs), f"{what} ({time.perf_counter() - t0:.1f} s)")

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def has_labels(self) -> bool:
        return all(p.has_labels for p in self.pairs)

    def _read(self, path: Path) -> Image:
        img = read_image(path)
        if img.ndim != self.grid.ndim:
            raise InputError(f"{path}: {img.ndim}D image in a dataset of {self.grid.ndim}D images")
        return img

    def _transform(self, pair: Pair) -> SpatialTransform | None:
        """The pre-alignment of ``pair`` (computed once), or None without ``prealign``."""
        if self.prealign is None:
            return None
        key = f"{pair.fixed_subject.name}/{pair.moving_subject.name}"
        if key not in self.prealignments:
            fixed, moving = self._read(pair.fixed), self._read(pair.moving)
            self.prealignments[key] = self.prealign(fixed, moving)
        return self.prealignments[key]

    def _load(self, path: Path, labels: bool, pair: Pair | None = None) -> torch.Tensor:
        """``path`` on the network grid; a moving file of ``pair`` goes through its
        pre-alignment (cached per fixed image)."""
        transform = self._transform(pair) if pair is not None else None
        key = (path, labels, pair.fixed if transform is not None else None)
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
            "fixed": self._load(pair.fixed, False),
            "moving": self._load(pair.moving, False, pair),
            "index": int(index),
            "names": (pair.fixed_subject.name, pair.moving_subject.name),
        }
        if pair.has_labels:
            item["fixed_labels"] = self._load(pair.fixed_labels, True)
            item["moving_labels"] = self._load(pair.moving_labels, True, pair)
        return item


def collate_pairs(items: Sequence[dict], grid: Grid | None = None, projection: bool = False):
    """Stack dataset items into a ``RegistrationBatch`` on the network grid ``grid`` (labels
    and ``target`` only if every item has them). ``projection``: the fixed images are X-rays
    of the moving volumes (2D/3D methods), so the moving images are the ones on ``grid``."""
    from learnreg.methods.base import RegistrationBatch

    if not items:
        raise ValueError("collate_pairs: empty batch")
    stack = {k: torch.stack([it[k] for it in items]) for k in ("fixed", "moving")}
    for k in ("fixed_labels", "moving_labels", "target"):
        stack[k] = torch.stack([it[k] for it in items]) if all(k in it for it in items) else None
    on_grid = stack["moving" if projection else "fixed"]
    if grid is not None and tuple(on_grid.shape[2:]) != grid.shape:
        raise ValueError(
            f"collate_pairs: images {tuple(on_grid.shape[2:])} are not on the grid {grid.shape}"
        )
    return RegistrationBatch(**stack, grid=grid)
