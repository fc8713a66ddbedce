"""Synthetic homography pairs from real images: DeTone et al. (2016)'s training protocol.

DeTone, Malisiewicz and Rabinovich, "Deep Image Homography Estimation" (arXiv:1606.03798):
a grayscale image is resized to 320×240; a random square patch (128×128) is chosen at a
position ``p`` at least ρ (= 32) pixels from the border; each of its four corners is moved by
a random offset in ``[-ρ, ρ]²``; the homography ``H`` between the original and the perturbed
corners warps the image, and the patch at ``p`` of the warped image is the second patch. The
network regresses the eight corner offsets (the "4-point parameterization").

In this package's convention (``ARCHITECTURE.md``) a transform maps fixed points to moving
points and the network predicts it, so a pair is:

- ``moving``: the plain crop, ``moving(y) = I(p + y)``;
- ``fixed``: the image sampled in the perturbed quadrilateral,
  ``fixed(x) = I(p + T(x))`` where ``T`` maps each patch corner ``c_k`` to ``c_k + δ_k``;
- ``target``: the offsets ``δ`` ``(4, 2)`` of ``T`` at the corners ``c``
  (:func:`learnreg.methods.homography.patch_corners`: the voxel centres ``(0, 0), (0, P−1),
  (P−1, P−1), (P−1, 0)``, in index ``(i, j)`` order, voxel units of the item's grid), so
  that ``moving(T(x)) = fixed(x)``: DeTone's pair with the warped patch as the fixed image and
  ``H_4pt`` as the fixed→moving corner offsets.

The fixed patch lies inside the image by construction (``p`` is at least ρ from the border);
the moving patch misses part of what the fixed one shows near its border, as in DeTone's data.

``downsample=f`` area-averages both patches by ``f`` after generating them at full size and
expresses ``target`` (and ``homography``) on the coarse grid (whose voxel ``x`` covers full
voxels ``f x + (f−1)/2``): the same random pairs as ``downsample=1`` with the same seed, at
a resolution a CPU network can afford. (DeTone evaluated the same way: networks trained on
128×128 patches run on 2× downsampled 256×256 test patches.)

Sources (grayscale in [0, 1], split by source image so that held-out pairs come from images
never seen in training):

- :func:`photo_images`: photographs bundled in the scikit-image wheel (``skimage.data``;
  nothing is downloaded); scikit-image is needed only here (the ``[test]`` extra);
- :func:`brain_slice_images`: the 2D brain MR slices of ANTs' examples (``ants2d/*.jpg``);
- :func:`folder_images`: the 2D images of any folder.

``learnreg train`` builds these pairs by name (:func:`homography_source`, ``data.synthetic:
{kind: homography, ...}``); the training set's :attr:`HomographyPairs.grid` is the patch grid
and its :attr:`~HomographyPairs.preprocessor` puts a new image pair on a grid of that size over
the fixed image's field of view, so ``learnreg register --model`` predicts the homography of
any pair in world space.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.data.preprocess import NetworkGrid, Preprocessor, normalize_intensity
from learnreg.data.sources import register_source
from learnreg.methods.homography import patch_corners
from learnreg.spatial.homography import Homography
from learnreg.spatial.sampling import sample_index

__all__ = [
    "PHOTOS",
    "BRAIN_SLICES",
    "SPLITS",
    "IMAGE_SOURCES",
    "photo_images",
    "brain_slice_images",
    "folder_images",
    "source_images",
    "source_options",
    "HomographyPairs",
    "homography_pairs",
    "homography_source",
]

SPLITS = ("train", "heldout", "all")

#: scikit-image photographs by split. Not used: ``microaneurysms`` (102×102, too small),
#: ``horse``/``logo``/``chessboard`` (not photographs), the right motorcycle view (the same
#: scene as the held-out left view).
PHOTOS: dict[str, tuple[str, ...]] = {
    "train": (
        "astronaut",
        "brick",
        "cell",
        "chelsea",
        "clock",
        "grass",
        "gravel",
        "hubble_deep_field",
        "immunohistochemistry",
        "moon",
        "page",
        "retina",
        "rocket",
        "text",
    ),
    "heldout": ("camera", "coffee", "coins", "motorcycle_left"),
}

#: ANTs' 2D brain slices (``r16slice.jpg`` …) by split.
BRAIN_SLICES: dict[str, tuple[str, ...]] = {
    "train": ("r16slice", "r27slice", "r30slice", "r62slice", "r64slice"),
    "heldout": ("r85slice",),
}

_DEFAULT_ANTS2D = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "ants2d"


def _names(table: Mapping[str, tuple[str, ...]], split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return table["train"] + table["heldout"] if split == "all" else table[split]


def _resize(image: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
    """``(H, W)`` float image resized (antialiased bilinear) to ``size``, or unchanged."""
    if size is None or tuple(image.shape) == tuple(size):
        return image
    out = F.interpolate(
        image[None, None], size=tuple(int(s) for s in size), mode="bilinear", antialias=True
    )
    return out[0, 0].clamp(0, 1)


def _check_size(image_size: Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or any(s < 1 for s in size):
        raise ValueError(f"image_size must be (rows, cols), got {tuple(image_size)}")
    return size  # type: ignore[return-value]


def photo_images(
    split: str = "train", image_size: Sequence[int] | None = (240, 320)
) -> dict[str, torch.Tensor]:
    """Grayscale photographs of ``skimage.data`` (bundled files only), ``name → (H, W)``.

    ``split``: ``"train"``, ``"heldout"`` or ``"all"`` (see :data:`PHOTOS`); ``image_size``:
    ``(rows, cols)`` every image is resized to (DeTone: 240×320), or None to keep sizes.
    Needs scikit-image.
    """
    try:
        from skimage import color
        from skimage import data as skdata
    except ImportError as e:  # pragma: no cover - scikit-image is in the test extra
        raise ImportError("photo_images needs scikit-image (pip install 'learnreg[test]')") from e
    size = _check_size(image_size)
    out = {}
    for name in _names(PHOTOS, split):
        a = skdata.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skdata, name)()
        a = np.asarray(a)
        if a.ndim == 3:
            a = color.rgb2gray(a[..., :3])  # float in [0, 1]
        else:
            a = a.astype(np.float64) / (255.0 if a.dtype == np.uint8 else max(a.max(), 1))
        out[name] = _resize(torch.from_numpy(np.ascontiguousarray(a)).float(), size)
    return out


def brain_slice_images(
    split: str = "train",
    image_size: Sequence[int] | None = (240, 320),
    folder: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """ANTs' 2D brain slices, ``name → (H, W)`` in [0, 1] (see :data:`BRAIN_SLICES`).

    ``folder``: where the ``*.jpg`` files are (default ``$LEARNREG_DATA/ants2d``, else the
    shared data folder next to the repository). Read with :func:`learnreg.io.images.
    read_image`, so axis 0 is the image's x (SimpleITK's order transposed at the I/O
    boundary); for homography pairs that is just another image.
    """
    from learnreg.io.images import read_image

    if folder is None:
        env = os.environ.get("LEARNREG_DATA")
        folder = Path(env) / "ants2d" if env else _DEFAULT_ANTS2D
    folder = Path(folder)
    size = _check_size(image_size)
    out = {}
    for name in _names(BRAIN_SLICES, split):
        path = folder / f"{name}.jpg"
        if not path.is_file():
            raise InputError(f"{path}: brain slice not found (set LEARNREG_DATA or folder)")
        a = read_image(path).data[0]
        lo, hi = float(a.min()), float(a.max())
        out[name] = _resize((a - lo) / max(hi - lo, 1e-8), size)
    return out


def folder_images(
    folder: str | os.PathLike,
    image_size: Sequence[int] | None = (240, 320),
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The 2D grayscale images of ``folder`` (any format :func:`learnreg.io.images.
    read_image` reads; ``names`` selects by file name), ``name → (H, W)`` min-max scaled to
    [0, 1] and resized to ``image_size`` (None: keep sizes)."""
    from learnreg.data.datasets import folder_subjects
    from learnreg.io.images import read_image

    size = _check_size(image_size)
    out = {}
    for name, subject in folder_subjects(folder, None, names, require_labels=False).items():
        a = read_image(subject.image).data
        if a.dim() != 3 or a.shape[0] != 1:
            raise InputError(f"{subject.image}: a 2D single-channel image is needed here")
        a = a[0]
        lo, hi = float(a.min()), float(a.max())
        out[name] = _resize((a - lo) / max(hi - lo, 1e-8), size)
    if not out:
        raise InputError(f"{folder}: no images")
    return out


#: named 2D image sources of :func:`source_images` (anything else is a folder).
IMAGE_SOURCES = ("photos", "brains", "both")


def source_images(
    source: str | os.PathLike,
    split: str = "train",
    image_size: Sequence[int] | None = (240, 320),
    folder: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """2D images of a named source — ``"photos"`` (:func:`photo_images`), ``"brains"``
    (:func:`brain_slice_images`, from ``folder``), ``"both"`` — for ``split``; or of an image
    folder (``split`` ignored: the whole folder)."""
    if str(source) not in IMAGE_SOURCES:
        return folder_images(source, image_size)
    images: dict[str, torch.Tensor] = {}
    if source in ("photos", "both"):
        images.update(photo_images(split, image_size))
    if source in ("brains", "both"):
        images.update(brain_slice_images(split, image_size, folder))
    return images


def source_options(kind: str, options: dict, defaults: dict) -> dict:
    """``defaults`` updated by ``options`` of ``data.synthetic`` of ``kind``; unknown keys
    raise :class:`InputError` with the valid ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise InputError(
            f"unknown config key {', '.join('data.synthetic.' + k for k in unknown)} of "
            f"kind {kind}; valid keys: {', '.join(['kind', *sorted(defaults)])}"
        )
    return {**defaults, **options}


def normalized(images: Mapping[str, torch.Tensor], percentiles) -> dict[str, torch.Tensor]:
    """``images`` normalized as the preprocessor normalizes inputs at prediction
    (:func:`~learnreg.data.preprocess.normalize_intensity` with ``percentiles``; None keeps
    them)."""
    if percentiles is None:
        return dict(images)
    return {k: normalize_intensity(v, percentiles) for k, v in images.items()}


class HomographyPairs(Dataset):
    """DeTone's random patch + random corner perturbation pairs, as a reproducible Dataset.

    Args:
        images: ``name → (H, W)`` grayscale images (e.g. :func:`photo_images`), all at least
            ``patch_size + 2 rho`` in each dimension.
        length: number of items; item ``i`` is a pure function of ``(seed, i)``, so a
            training run sees ``length`` different pairs and an evaluation set is fixed.
        patch_size: side of the square patch at full resolution (DeTone: 128).
        rho: maximum corner perturbation in full-resolution pixels (DeTone: 32); the patch
            position keeps ``rho`` pixels from every border.
        downsample: integer factor by which both patches are area-averaged (``target`` is on
            the coarse grid); ``patch_size`` must be divisible by it.
        seed: seed of the whole set.
        context: full-resolution pixels of image around the patch in both items (default
            0): the items cover the patch grown by ``context`` on every side, ``fixed`` the
            perturbed quadrilateral's homography continued there, ``moving`` the larger plain
            crop, so a network can re-crop the moving patch anywhere near it (Nowruzi et al.'s
            hierarchy) instead of re-warping a patch with black borders. ``target`` and
            ``homography`` are on the grown grid (corners of the grown grid); the patch is
            its centre, ``context / downsample`` voxels from every border.
        preprocessor: how a new image pair is put on the network grid at prediction time
            (its network shape must be the patch grid's); default: a grid of the patch size
            over the fixed image's field of view, no intensity normalization.

    Items are dicts ``{"fixed", "moving"}`` ``(1, P, P)`` float32 (``P = patch_size //
    downsample``), ``"target"`` ``(4, 2)`` corner offsets (voxels, index order, fixed→moving
    at :func:`patch_corners`), ``"homography"`` ``(3, 3)`` the matrix of that map on the
    item grid, ``"origin"`` ``(2,)`` the patch position ``p`` (full-resolution index),
    ``"index"`` and ``"names"`` ``(source, source)``: what
    :func:`learnreg.data.datasets.collate_pairs` stacks into a ``RegistrationBatch``
    (``target`` included). :attr:`grid` is the network grid (unit spacing) and
    :attr:`preprocessor` describes it, as the trainer expects of a dataset.
    """

    def __init__(
        self,
        images: Mapping[str, torch.Tensor],
        length: int = 1000,
        patch_size: int = 128,
        rho: float = 32.0,
        downsample: int = 1,
        seed: int = 0,
        context: int = 0,
        preprocessor: Preprocessor | None = None,
    ) -> None:
        if not images:
            raise ValueError("HomographyPairs: no images")
        if length < 1:
            raise ValueError(f"HomographyPairs: length must be >= 1, got {length}")
        if patch_size < 2 or rho < 0:
            raise ValueError(
                f"HomographyPairs: need patch_size >= 2 and rho >= 0, got {patch_size}, {rho}"
            )
        if downsample < 1 or patch_size % downsample:
            raise ValueError(
                f"HomographyPairs: downsample ({downsample}) must be a positive divisor of "
                f"patch_size ({patch_size})"
            )
        if context < 0 or context % downsample:
            raise ValueError(
                f"HomographyPairs: context ({context}) must be >= 0 and divisible by "
                f"downsample ({downsample})"
            )
        self.names = list(images)
        self.images = []
        margin = int(np.ceil(rho)) + int(context)
        for n in self.names:
            img = torch.as_tensor(images[n]).float()
            if img.dim() != 2:
                raise ValueError(
                    f"HomographyPairs: image {n!r} must be 2D (H, W), got {tuple(img.shape)}"
                )
            if min(img.shape) < patch_size + 2 * margin:
                raise ValueError(
                    f"HomographyPairs: image {n!r} of size {tuple(img.shape)} is smaller than "
                    f"patch_size + 2 (rho + context) = {patch_size + 2 * margin}"
                )
            self.images.append(img.contiguous())
        self.length, self.patch_size, self.rho = int(length), int(patch_size), float(rho)
        self.downsample, self.seed, self.margin = int(downsample), int(seed), margin
        self.context = int(context)
        self.size = (self.patch_size + 2 * self.context) // self.downsample
        self.grid = Grid((self.size, self.size))
        if preprocessor is None:
            preprocessor = Preprocessor(NetworkGrid(shape=self.grid.shape), percentiles=None)
        if preprocessor.network.shape != self.grid.shape:
            raise ValueError(
                f"HomographyPairs: the preprocessor's network shape "
                f"{preprocessor.network.shape} is not the patch grid {self.grid.shape}"
            )
        self.preprocessor = preprocessor
        full = self.patch_size + 2 * self.context
        pts = Grid((full, full)).index_points(torch.float64) - self.context
        self._points = pts.reshape(1, -1, 2)  # full-resolution item voxels in patch index
        self._corners = patch_corners(self.patch_size, torch.float64)[None]
        f = float(self.downsample)
        # coarse voxel x covers full voxels f x + (f - 1)/2
        self._scale = torch.tensor(
            [[f, 0.0, (f - 1) / 2], [0.0, f, (f - 1) / 2], [0.0, 0.0, 1.0]], dtype=torch.float64
        )

    has_labels = False

    def __len__(self) -> int:
        return self.length

    def draw(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The random choices of item ``index``: source image, patch origin ``(2,)`` and
        corner offsets ``(4, 2)`` (full resolution)."""
        if not 0 <= index < self.length:
            raise IndexError(f"HomographyPairs: index {index} out of range [0, {self.length})")
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % (2**63 - 1))
        k = int(torch.randint(len(self.images), (1,), generator=g))
        h, w = self.images[k].shape
        m, p = self.margin, self.patch_size
        origin = torch.tensor(
            [
                int(torch.randint(m, h - m - p + 1, (1,), generator=g)),
                int(torch.randint(m, w - m - p + 1, (1,), generator=g)),
            ],
            dtype=torch.float64,
        )
        offsets = (torch.rand(4, 2, generator=g, dtype=torch.float64) * 2 - 1) * self.rho
        return k, origin, offsets

    def __getitem__(self, index: int) -> dict:
        k, origin, offsets = self.draw(int(index))
        img = self.images[k][None, None]
        t = Homography.from_corners(self._corners, self._corners + offsets[None])
        pts = origin + t(self._points)  # full-resolution image index of the item's voxels
        p, c = self.patch_size + 2 * self.context, self.context
        fixed = sample_index(img.double(), pts.view(1, p, p, 2)).float()[0]
        i, j = int(origin[0]) - c, int(origin[1]) - c
        moving = img[0, :, i : i + p, j : j + p].clone()
        h = t.homogeneous()[0]
        if c:  # on the grown grid: x ↦ T(x − c) + c
            shift = torch.eye(3, dtype=h.dtype)
            shift[:2, 2] = c
            h = shift @ h @ torch.linalg.inv(shift)
        if self.downsample > 1:
            f = self.downsample
            fixed, moving = F.avg_pool2d(fixed, f), F.avg_pool2d(moving, f)
            h = torch.linalg.inv(self._scale) @ h @ self._scale
            h = h / h[2, 2]
        corners = patch_corners(self.size, torch.float64)
        target = Homography.from_matrix(h)(corners[None])[0] - corners
        name = self.names[k]
        return {
            "fixed": fixed.contiguous(),
            "moving": moving.contiguous(),
            "target": target.float(),
            "homography": h.float(),
            "origin": origin.float(),
            "index": int(index),
            "names": (name, name),
        }


def homography_pairs(
    source: str = "photos",
    split: str = "train",
    *,
    image_size: Sequence[int] = (240, 320),
    folder: str | os.PathLike | None = None,
    **options,
) -> HomographyPairs:
    """:class:`HomographyPairs` of ``source`` — ``"photos"``, ``"brains"`` or ``"both"`` —
    images of ``split``, resized to ``image_size``; ``options`` go to the dataset."""
    if source not in IMAGE_SOURCES:
        raise ValueError(f"source must be one of {IMAGE_SOURCES}, got {source!r}")
    return HomographyPairs(source_images(source, split, image_size, folder), **options)


_HOMOGRAPHY_DEFAULTS = {
    "images": "photos",
    "val_images": None,
    "image_size": [240, 320],
    "folder": None,
    "patch_size": None,
    "rho": None,
    "downsample": 1,
    "length": 10000,
    "seed": 0,
    "val_length": 256,
    "val_seed": None,
    "context": 0,
}


@register_source("homography")
def homography_source(
    options: dict, preprocessor: Preprocessor
) -> tuple[HomographyPairs, HomographyPairs | None]:
    """``data.synthetic: {kind: homography, ...}``: DeTone's pairs for ``learnreg train``.

    Keys (defaults): ``images`` (``photos``: a source of :func:`source_images` or an image
    folder), ``val_images`` (default: the held-out split of a named source, none for a
    folder; ``false``: no validation), ``image_size`` ([240, 320]; ``null`` keeps sizes),
    ``folder`` (of the brain slices), ``patch_size`` (full-resolution patch; default the
    network size × ``downsample``), ``rho`` (default ``patch_size / 4``, DeTone's 32 for 128),
    ``downsample`` (1), ``length`` (10000), ``seed`` (0), ``val_length`` (256), ``val_seed``
    (``seed + 1``), ``context`` (0: full-resolution pixels of image around the patch,
    :class:`HomographyPairs`). The network size is ``data.shape`` or the method's input shape; source
    images are normalized with ``data.percentiles`` as inputs are at prediction.
    """
    o = source_options("homography", options, _HOMOGRAPHY_DEFAULTS)
    net = preprocessor.network
    down = int(o["downsample"])
    if o["patch_size"] is None:
        if net.shape is None or len(net.shape) != 2 or net.shape[0] != net.shape[1]:
            raise InputError(
                "config data.synthetic (homography): give patch_size, or data.shape / a "
                f"fixed-size method with a square 2D input (network shape {net.shape})"
            )
        o["patch_size"] = int(net.shape[0]) * down - 2 * int(o["context"])
    patch, context = int(o["patch_size"]), int(o["context"])
    if down < 1 or patch % down or context % down or context < 0:
        raise InputError(
            f"config data.synthetic (homography): downsample ({down}) must divide "
            f"patch_size ({patch}) and context ({context} >= 0)"
        )
    shape = ((patch + 2 * context) // down,) * 2
    if net.shape is not None and tuple(net.shape) != shape:
        raise InputError(
            f"config data.synthetic (homography): patches of {patch} px with {context} px of "
            f"context, downsampled {down}×, are {shape}; the network grid is "
            f"{tuple(net.shape)}"
        )
    pre = Preprocessor(
        NetworkGrid(shape, net.spacing, net.orientation, 0),
        preprocessor.percentiles,
        preprocessor.antialias,
    )
    size = None if o["image_size"] is None else tuple(o["image_size"])
    pairs = {
        "patch_size": patch,
        "rho": patch / 4 if o["rho"] is None else float(o["rho"]),
        "downsample": down,
        "context": context,
        "preprocessor": pre,
    }
    seed = int(o["seed"])
    try:
        train_images = source_images(o["images"], "train", size, o["folder"])
        train = HomographyPairs(
            normalized(train_images, pre.percentiles), int(o["length"]), seed=seed, **pairs
        )
        val_source = o["val_images"]
        if val_source is None and str(o["images"]) in IMAGE_SOURCES:
            val_source = o["images"]
        val = None
        if val_source not in (None, False) and int(o["val_length"]) > 0:
            val_images = source_images(val_source, "heldout", size, o["folder"])
            val_seed = seed + 1 if o["val_seed"] is None else int(o["val_seed"])
            val = HomographyPairs(
                normalized(val_images, pre.percentiles),
                int(o["val_length"]),
                seed=val_seed,
                **pairs,
            )
    except ValueError as e:
        raise InputError(f"config data.synthetic (homography): {e}") from None
    return train, val
