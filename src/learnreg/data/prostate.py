"""MR–TRUS prostate pairs with multi-channel label masks (Hu et al. 2018's weak supervision).

The folder layout is ``<root>/<split>/{moving_images, fixed_images, moving_labels,
fixed_labels}/<case>.nii.gz``: moving = MR, fixed = transrectal ultrasound (TRUS), on
*different* grids. Label files are 4D ``(…, L)``: one binary mask per channel (channel 0 the
gland, the others small landmark regions); masks may overlap, so they stay separate channels
rather than one label map. ``L`` varies between cases (1 to 3 in the shared data: not every
case has landmarks); :class:`ProstatePairs` pads to a fixed channel count with empty masks,
which the loss of ``hu-global-local`` ignores (a channel counts only where both masks are
non-empty).

Everything is put on one **network grid** in physical space: by default the first fixed
(TRUS) image's field of view, RAS-oriented, at 0.8 mm isotropic, padded to a multiple of
``2**levels`` (:class:`~learnreg.data.preprocess.NetworkGrid`); a dataset's ``preprocessor``
puts a new image on a grid of that shape and spacing centred on its own field of view.
Images are percentile normalized and resampled (anti-aliased, linear) by
:class:`~learnreg.data.preprocess.Preprocessor`; masks are resampled linearly channel by
channel into soft masks in ``[0, 1]`` (as Hu et al.'s label-reg feeds them to its Dice loss).
The original images and masks are kept so that predictions can be evaluated on the native
TRUS grid in world millimetres (:func:`mask_centroids`, :func:`warp_masks`).

:class:`MaskAugmenter` is the random affine augmentation of label-reg (an independent random
affine for the fixed and for the moving image of each pair, applied to the image and its
masks alike); it has the ``augmenter(item, generator)`` interface of
:class:`~learnreg.train.Trainer`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.data.augment import AugmentConfig, random_displacement
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.io.images import read_image, read_labels
from learnreg.spatial.base import SpatialTransform
from learnreg.spatial.sampling import resample, warp

__all__ = [
    "PROSTATE_FOLDERS",
    "PROSTATE_CHANNELS",
    "ProstateCase",
    "ProstatePairs",
    "MaskAugmenter",
    "prostate_cases",
    "read_masks",
    "resample_masks",
    "warp_masks",
    "mask_centroids",
]

PROSTATE_FOLDERS = ("moving_images", "fixed_images", "moving_labels", "fixed_labels")
PROSTATE_CHANNELS = ("gland", "landmark 1", "landmark 2")


@dataclass(frozen=True)
class ProstateCase:
    """The four files of one case (moving = MR, fixed = TRUS)."""

    name: str
    fixed_image: Path
    moving_image: Path
    fixed_labels: Path
    moving_labels: Path


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def prostate_cases(
    root: str | os.PathLike, split: str = "train", names: Sequence[str] | None = None
) -> list[ProstateCase]:
    """The cases of ``<root>/<split>`` (sorted by name), or only ``names``.

    Raises ValueError for a missing folder, a case missing one of its four files, or an
    unknown name.
    """
    base = Path(root) / split
    if not base.is_dir():
        raise ValueError(f"prostate data: split folder {base} not found")
    files: dict[str, dict[str, Path]] = {}
    for folder in PROSTATE_FOLDERS:
        d = base / folder
        if not d.is_dir():
            raise ValueError(f"prostate data: folder {d} not found (need {PROSTATE_FOLDERS})")
        files[folder] = {_stem(p): p for p in d.iterdir() if p.name.endswith((".nii", ".nii.gz"))}
    all_names = sorted(set().union(*[set(v) for v in files.values()]))
    incomplete = [n for n in all_names if any(n not in files[f] for f in PROSTATE_FOLDERS)]
    if incomplete:
        raise ValueError(
            f"prostate data: cases {incomplete} in {base} lack some of {PROSTATE_FOLDERS}"
        )
    if not all_names:
        raise ValueError(f"prostate data: no cases in {base}")
    if names is not None:
        unknown = sorted(set(names) - set(all_names))
        if unknown:
            raise ValueError(f"prostate data: unknown cases {unknown}; available: {all_names}")
        all_names = list(names)
    return [
        ProstateCase(
            n,
            files["fixed_images"][n],
            files["moving_images"][n],
            files["fixed_labels"][n],
            files["moving_labels"][n],
        )
        for n in all_names
    ]


def read_masks(path: str | os.PathLike) -> Image:
    """A label file with one binary mask per channel (last axis) as float32 ``(L, *S)``.

    A 2D/3D file gives one channel. Raises ValueError if the values are not 0/1.
    """
    lab = read_labels(path, allow_channels=True)
    values = torch.unique(lab.data)
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError(
            f"{path}: expected binary masks (0/1) per channel, got values {values.tolist()[:10]}"
        )
    return lab.with_data(lab.data.to(torch.float32))


def resample_masks(masks: Image, grid: Grid, transform: SpatialTransform | None = None) -> Image:
    """Resample masks ``(L, *S)`` onto ``grid`` in physical space (linear: soft masks in
    ``[0, 1]``, 0 outside the masks' field of view), through an optional ``transform``
    (grid world → mask world)."""
    if not masks.data.is_floating_point():
        masks = masks.with_data(masks.data.to(torch.float32))
    return resample(masks, grid, transform, mode="linear", padding="zeros")


def warp_masks(
    masks: Image, grid: Grid, transform: SpatialTransform | None, threshold: float = 0.5
) -> torch.Tensor:
    """Binary masks ``(L, *grid.shape)`` (uint8): ``masks`` pulled onto ``grid`` through
    ``transform`` (``grid`` world → ``masks`` world; None: identity) and thresholded.

    Per channel this is the label-safe warp of ``ARCHITECTURE.md`` (one-hot linear
    interpolation of {background, mask} and argmax is a threshold at 0.5)."""
    return (resample_masks(masks, grid, transform).data >= threshold).to(torch.uint8)


def mask_centroids(masks: Image | torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
    """World (RAS mm) centroid of every mask channel, ``(L, D)`` float64; NaN for an empty one.

    ``masks`` is an :class:`Image` ``(L, *S)`` or a tensor ``(L, *S)`` with its ``grid``.
    Soft masks weight each voxel by its value.
    """
    if isinstance(masks, Image):
        data, grid = masks.data, masks.grid
    else:
        if grid is None:
            raise ValueError("mask_centroids: a tensor needs its grid")
        data = masks
    if data.dim() != grid.ndim + 1 or tuple(data.shape[1:]) != grid.shape:
        raise ValueError(
            f"mask_centroids: masks {tuple(data.shape)} do not match (L, *{grid.shape})"
        )
    w = data.to(torch.float64).reshape(data.shape[0], -1)
    pts = grid.world_points(torch.float64, data.device).reshape(-1, grid.ndim)
    total = w.sum(1, keepdim=True)
    c = (w @ pts) / total
    return torch.where(total > 0, c, torch.full_like(c, float("nan")))


class ProstatePairs(Dataset):
    """MR (moving) → TRUS (fixed) pairs on one network grid, with soft multi-channel masks.

    Args:
        root: the data folder holding ``train/`` and ``test/``.
        split: ``"train"`` or ``"test"`` (any sub-folder with the four folders).
        names: only these cases (default all, sorted).
        spacing: network grid spacing in mm (isotropic if a float).
        levels: the grid's shape is a multiple of ``2**levels`` (U-Net depth).
        grid: use this network grid instead (e.g. the training set's for a test set).
        percentiles: intensity percentiles mapped to 0 and 1.
        labels: load the masks (needed for training and evaluation, not for prediction).
        channels: masks per item; files with fewer channels are padded with empty masks.

    Items: ``fixed``, ``moving`` ``(1, *S)`` float32 in ``[0, 1]``; ``fixed_labels``,
    ``moving_labels`` ``(channels, *S)`` float32 soft masks; ``index``; ``names`` (case, case).
    :meth:`originals` gives the native images and masks for evaluation.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        names: Sequence[str] | None = None,
        spacing: float | Sequence[float] = 0.8,
        levels: int = 3,
        grid: Grid | None = None,
        percentiles: Sequence[float] = (1.0, 99.0),
        labels: bool = True,
        channels: int = 3,
    ) -> None:
        if channels < 1:
            raise ValueError(f"ProstatePairs: channels must be >= 1, got {channels}")
        self.channels = int(channels)
        self.cases = prostate_cases(root, split, names)
        self.labels = bool(labels)
        self._originals: dict[int, dict[str, Image]] = {}
        self._items: dict[int, dict] = {}
        first = self._read(0)
        ndim = first["fixed"].ndim
        sp = (float(spacing),) * ndim if isinstance(spacing, (int, float)) else tuple(spacing)
        if grid is None:
            grid = Preprocessor(NetworkGrid(spacing=sp, levels=levels)).grid_for(first["fixed"])
        if grid.ndim != ndim:
            raise ValueError(f"ProstatePairs: a {grid.ndim}D grid for {ndim}D images")
        self.grid = grid
        # a new TRUS image gets a grid of the same shape and spacing over its field of view
        # (what fixed-size networks, e.g. hu-global-local's global network, need)
        self.preprocessor = Preprocessor(NetworkGrid(grid.shape, grid.spacing), percentiles)
        for i in range(len(self.cases)):
            self[i]

    def __len__(self) -> int:
        return len(self.cases)

    def _read(self, index: int) -> dict[str, Image]:
        if index not in self._originals:
            c = self.cases[index]
            out = {"fixed": read_image(c.fixed_image), "moving": read_image(c.moving_image)}
            if self.labels:
                out["fixed_labels"] = read_masks(c.fixed_labels)
                out["moving_labels"] = read_masks(c.moving_labels)
                for role in ("fixed", "moving"):
                    if not out[f"{role}_labels"].grid.allclose(out[role].grid):
                        raise ValueError(f"{c.name}: {role} labels and image grids differ")
                nf, nm = out["fixed_labels"].channels, out["moving_labels"].channels
                if nf != nm or nf > self.channels:
                    raise ValueError(
                        f"{c.name}: fixed and moving label files must have the same number of "
                        f"channels, at most {self.channels}; got {nf} and {nm}"
                    )
            self._originals[index] = out
        return self._originals[index]

    def originals(self, index: int) -> dict[str, Image]:
        """The native ``fixed``, ``moving`` images and (with labels) their masks."""
        return self._read(index)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"ProstatePairs: index {index} out of range ({len(self)} pairs)")
        if index not in self._items:
            o = self._read(index)
            item: dict = {
                "fixed": self.preprocessor.image(o["fixed"], self.grid).data.contiguous(),
                "moving": self.preprocessor.image(o["moving"], self.grid).data.contiguous(),
                "index": int(index),
                "names": (self.cases[index].name, self.cases[index].name),
            }
            if self.labels:
                for role in ("fixed", "moving"):
                    m = resample_masks(o[f"{role}_labels"], self.grid).data
                    pad = m.new_zeros(self.channels - m.shape[0], *m.shape[1:])
                    item[f"{role}_labels"] = torch.cat([m, pad]).contiguous()
            self._items[index] = item
        return self._items[index]


class MaskAugmenter:
    """Random affine augmentation of label-reg: each image of a pair gets its own random
    affine (rotation, scale, translation about the grid centre; ranges of
    :class:`~learnreg.data.augment.AugmentConfig`), applied to the image and its soft masks
    by linear interpolation. 2D and 3D; the Trainer's ``augmenter(item, generator)``."""

    def __init__(
        self,
        rotation: float = 5.0,
        scale: float = 0.05,
        translation: float = 1.5,
        probability: float = 1.0,
    ) -> None:
        self.config = AugmentConfig(
            rotation=rotation, scale=scale, translation=translation, probability=probability
        )

    def __call__(self, item: dict, generator: torch.Generator) -> dict:
        out = dict(item)
        if not self.config.spatial:
            return out
        for role in ("fixed", "moving"):
            if float(torch.rand(1, generator=generator)) >= self.config.probability:
                continue
            img = item[role]
            u = random_displacement(tuple(img.shape[1:]), self.config, generator).to(img)
            out[role] = warp(img.unsqueeze(0), u)[0]
            key = f"{role}_labels"
            if item.get(key) is not None:
                lab = item[key]
                if not lab.is_floating_point():
                    raise ValueError(
                        f"MaskAugmenter: {key} must be float masks (L, *S), got {lab.dtype}"
                    )
                out[key] = warp(lab.unsqueeze(0), u.to(lab))[0]
        return out
