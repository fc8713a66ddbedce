"""Random rigid and affine perturbations of images with known parameters (supervision targets).

Networks that regress global transforms are trained and evaluated on images moved by a
transform whose parameters are known. Here such a transform ``T`` is drawn at random and the
*moving* image (and its label map) is replaced by ``moving ∘ T⁻¹``: a structure at ``x`` moves
to ``T(x)``, so ``T`` maps fixed points to moving points (``ARCHITECTURE.md``; warping the new
moving image by ``T`` gives back the old one) and its parameters are the item's ``target``.

Conventions (those of :mod:`learnreg.spatial.linear`), in **voxel index coordinates** of the
image grid, about the grid centre ``c = (S − 1) / 2``: ``x ↦ L (x − c) + c + t`` with

- ``"rigid"``: :class:`~learnreg.spatial.linear.Rigid` parameters ``[ω, t]``, ``L = exp([ω]×)``
  (one angle in 2D, a rotation vector in 3D, radians; ``P = 3`` or ``6``);
- ``"affine"``: :class:`~learnreg.spatial.linear.Affine` parameters ``[L − I | t]`` row-major
  (``P = 6`` or ``12``), with ``L = R · Sh · diag(s)`` (rotation, upper-triangular shear,
  scales) drawn at random.

Translations are in voxels. Rotations in index space are physical rotations on grids with
isotropic voxels, as the network grids used for these methods are (``G M G⁻¹``, ``G`` the
grid's index-to-world matrix, is then a rotation of world points).

``data.synthetic: {kind: perturb, ...}`` in a training config builds such pairs from a folder
of real images on the network grid (:func:`perturbed_datasets`): self-pairs (a subject and a
moved copy; the whole answer is known: supervised rigid or affine regression) or
atlas-to-subject pairs with an added random transform (unsupervised affine networks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid, apply_matrix
from learnreg.data.datasets import Pair, PairDataset, atlas_pairs, folder_subjects
from learnreg.data.preprocess import Preprocessor, sample_labels_index
from learnreg.data.sources import register_source
from learnreg.spatial.linear import Affine, Rigid, rotation_matrix
from learnreg.spatial.sampling import sample_index

__all__ = [
    "KINDS",
    "num_params",
    "random_rigid_params",
    "random_affine_params",
    "params_to_matrix",
    "apply_matrix_to_image",
    "RandomPerturbation",
    "PerturbedPairs",
    "PerturbOptions",
    "perturbed_datasets",
]

KINDS = ("rigid", "affine")
_CLASSES = {"rigid": Rigid, "affine": Affine}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _check_ndim(ndim: int) -> None:
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    s = tuple(int(v) for v in shape)
    if len(s) not in (2, 3) or any(v < 1 for v in s):
        raise ValueError(f"shape must be 2 or 3 positive sizes, got {tuple(shape)}")
    return s


def _check_range(name: str, value: float, upper: float | None = None) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (upper is not None and v >= upper):
        bound = f" and < {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be >= 0{bound}, got {value}")
    return v


def num_params(kind: str, ndim: int) -> int:
    """Number of parameters of a ``kind`` (``"rigid"`` / ``"affine"``) transform in ``ndim``."""
    _check_kind(kind)
    _check_ndim(ndim)
    return _CLASSES[kind].num_params(ndim)


def _uniform(n: int, k: int, bound: float, generator: torch.Generator | None) -> torch.Tensor:
    return (torch.rand(n, k, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def random_rigid_params(
    n: int,
    ndim: int,
    rotation: float = 10.0,
    translation: float = 4.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` random :class:`~learnreg.spatial.linear.Rigid` parameters ``(n, P)`` (float32).

    Each rotation component (the angle in 2D, each rotation-vector component in 3D) is uniform
    in ``±rotation`` degrees, each translation component uniform in ``±translation`` voxels.
    """
    _check_ndim(ndim)
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    rot = math.radians(_check_range("rotation", rotation))
    tr = _check_range("translation", translation)
    nrot = 1 if ndim == 2 else 3
    omega = _uniform(n, nrot, rot, generator)
    t = _uniform(n, ndim, tr, generator)
    return torch.cat([omega, t], 1).float()


def random_affine_params(
    n: int,
    ndim: int,
    rotation: float = 10.0,
    translation: float = 4.0,
    scale: float = 0.1,
    shear: float = 0.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` random :class:`~learnreg.spatial.linear.Affine` parameters ``(n, D(D+1))``.

    ``L = R · Sh · diag(s)``: ``R`` as :func:`random_rigid_params`, each scale ``s_d``
    uniform in ``[1 − scale, 1 + scale]``, each upper-triangular shear coefficient uniform in
    ``±shear``; translation uniform in ``±translation`` voxels.
    """
    _check_ndim(ndim)
    sc = _check_range("scale", scale, upper=1.0)
    sh = _check_range("shear", shear)
    rigid = random_rigid_params(n, ndim, rotation, translation, generator).double()
    nrot = 1 if ndim == 2 else 3
    s = 1 + _uniform(n, ndim, sc, generator)
    iu = torch.triu_indices(ndim, ndim, 1)
    shear_m = torch.eye(ndim, dtype=torch.float64).repeat(n, 1, 1)
    shear_m[:, iu[0], iu[1]] = _uniform(n, iu.shape[1], sh, generator)
    lin = rotation_matrix(rigid[:, :nrot]) @ shear_m @ torch.diag_embed(s)
    m = torch.cat([lin - torch.eye(ndim, dtype=torch.float64), rigid[:, nrot:, None]], 2)
    return m.reshape(n, -1).float()


def params_to_matrix(params: torch.Tensor, kind: str, shape: Sequence[int]) -> torch.Tensor:
    """Homogeneous index-space matrices ``(N, D+1, D+1)`` of ``kind`` parameters ``(N, P)``
    about the centre of a grid of ``shape`` (differentiable)."""
    _check_kind(kind)
    s = _check_shape(shape)
    if params.dim() != 2 or params.shape[1] != num_params(kind, len(s)):
        raise ValueError(
            f"{kind} parameters for a {len(s)}D grid must be (N, {num_params(kind, len(s))}); "
            f"got {tuple(params.shape)}"
        )
    return _CLASSES[kind].from_params(params, center=Grid(s).index_center).homogeneous()


def apply_matrix_to_image(
    image: torch.Tensor, matrix: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``image ∘ M`` (linear, zero outside) and ``labels ∘ M`` (label-safe) for index-space
    matrices ``(N, D+1, D+1)``; ``image`` ``(N, C, *S)``, ``labels`` ``(N, 1, *S)`` int."""
    d = image.dim() - 2
    if d not in (2, 3):
        raise ValueError(f"image must be (N, C, *S) with 2 or 3 spatial dims, got {image.shape}")
    if matrix.shape[0] != image.shape[0]:
        raise ValueError(
            f"batch sizes differ: image {tuple(image.shape)}, matrix {tuple(matrix.shape)}"
        )
    if matrix.dim() != 3 or matrix.shape[1:] != (d + 1, d + 1):
        raise ValueError(
            f"apply_matrix_to_image: matrices for a {d}D image must be (N, {d + 1}, {d + 1}); "
            f"got {tuple(matrix.shape)}"
        )
    shape = tuple(image.shape[2:])
    pts = Grid(shape).index_points(torch.float64, image.device)
    pts = apply_matrix(matrix.to(torch.float64), pts.expand(matrix.shape[0], *pts.shape))
    out = sample_index(image, pts, "linear", "zeros")
    if labels is None:
        return out, None
    if labels.shape[0] != image.shape[0] or tuple(labels.shape[2:]) != shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must be (N, 1, *S) like image {tuple(image.shape)}"
        )
    return out, sample_labels_index(labels.cpu(), pts.cpu()).to(labels.device)


class RandomPerturbation:
    """Draws a random rigid or affine ``T`` and moves the moving image of an item by it.

    ``perturbation(item, generator)`` (the trainer's augmenter protocol) returns a copy of a
    dataset item with ``moving`` (and ``moving_labels``) replaced by ``moving ∘ T⁻¹`` and
    ``target`` set to ``T``'s parameters ``(P,)`` (module conventions). With
    ``self_pairs=True`` the fixed image (and labels) become the *original* moving image, so
    the pair is one subject in two poses and ``T`` is the whole answer (supervised training);
    otherwise ``target`` is only the added part of an unknown inter-subject transform.

    Args:
        kind: ``"rigid"`` or ``"affine"``.
        rotation: maximum rotation per component, degrees.
        translation: maximum translation per axis, voxels.
        scale, shear: affine only; see :func:`random_affine_params`.
        self_pairs: make the fixed image a copy of the unperturbed moving one.
    """

    def __init__(
        self,
        kind: str = "rigid",
        rotation: float = 10.0,
        translation: float = 4.0,
        scale: float = 0.1,
        shear: float = 0.05,
        self_pairs: bool = False,
    ) -> None:
        _check_kind(kind)
        self.kind = kind
        self.rotation = _check_range("rotation", rotation)
        self.translation = _check_range("translation", translation)
        self.scale = _check_range("scale", scale, upper=1.0)
        self.shear = _check_range("shear", shear)
        self.self_pairs = bool(self_pairs)

    def sample(self, n: int, ndim: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` random parameter vectors ``(n, P)``."""
        if self.kind == "rigid":
            return random_rigid_params(n, ndim, self.rotation, self.translation, generator)
        return random_affine_params(
            n, ndim, self.rotation, self.translation, self.scale, self.shear, generator
        )

    def apply(self, item: dict, params: torch.Tensor) -> dict:
        """``item`` with its moving image moved by the transform ``T`` of ``params`` ``(P,)``
        (resampled as ``moving ∘ T⁻¹``)."""
        for key in ("fixed", "moving"):
            if key not in item:
                raise ValueError(f"RandomPerturbation: item lacks {key!r}")
        moving = item["moving"]
        shape = tuple(moving.shape[1:])
        if params.shape != (num_params(self.kind, len(shape)),):
            raise ValueError(
                f"RandomPerturbation: {self.kind} parameters for a {len(shape)}D image must be "
                f"({num_params(self.kind, len(shape))},); got {tuple(params.shape)}"
            )
        matrix = params_to_matrix(params[None].double(), self.kind, shape)
        labels = item.get("moving_labels")
        img, lab = apply_matrix_to_image(
            moving[None], torch.linalg.inv(matrix), None if labels is None else labels[None]
        )
        out = dict(item)
        if self.self_pairs:
            out["fixed"] = moving
            if labels is not None:
                out["fixed_labels"] = labels
            else:
                out.pop("fixed_labels", None)
        out["moving"] = img[0]
        if lab is not None:
            out["moving_labels"] = lab[0]
        out["target"] = params.to(moving.dtype)
        return out

    def __call__(self, item: dict, generator: torch.Generator | None = None) -> dict:
        ndim = item["moving"].dim() - 1
        return self.apply(item, self.sample(1, ndim, generator)[0])


class PerturbedPairs(Dataset):
    """A dataset of items (e.g. a :class:`~learnreg.data.datasets.PairDataset`) whose moving
    images are randomly perturbed, reproducibly.

    Item ``i`` of epoch ``e`` is ``base[i mod len(base)]`` perturbed with a generator seeded
    by ``(seed, i, e)``; ``length`` (default ``len(base)``) lets a small base set yield many
    different perturbations. :meth:`set_epoch` changes the draws of every item.

    ``grid`` and ``preprocessor`` (default: the base dataset's, if it has them) are what the
    trainer needs to know of a training set: the network grid of the items and how a new
    image is put on it.
    """

    def __init__(
        self,
        base: Sequence[dict] | Dataset,
        perturbation: RandomPerturbation,
        seed: int = 0,
        length: int | None = None,
        grid: Grid | None = None,
        preprocessor: Preprocessor | None = None,
    ) -> None:
        n = len(base)  # type: ignore[arg-type]
        if n < 1:
            raise ValueError("PerturbedPairs: the base dataset is empty")
        if length is not None and length < 1:
            raise ValueError(f"PerturbedPairs: length must be positive, got {length}")
        self.base = base
        self.perturbation = perturbation
        self.seed = int(seed)
        self.length = n if length is None else int(length)
        self.epoch = 0
        self.grid = grid if grid is not None else getattr(base, "grid", None)
        self.preprocessor = (
            preprocessor if preprocessor is not None else getattr(base, "preprocessor", None)
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + index) * 1009 + self.epoch * 7919
        )
        item = self.base[index % len(self.base)]  # type: ignore[index]
        return self.perturbation(item, g)


# ---------------------------------------------------------------------------- training source
@dataclass
class PerturbOptions:
    """Options of ``data.synthetic: {kind: perturb, ...}`` (:func:`perturbed_datasets`).

    Args:
        images: folder of real images (absolute, or relative to the working directory).
        labels: folder of label maps of the same names (optional; moved label-safely with
            the images, e.g. for a validation Dice).
        atlas: name of the fixed image (atlas-to-subject pairs, the subject moved by an
            added random transform; ``target`` is only that added part). Without it, each
            pair is a subject and a moved copy of it (``target`` is the whole answer).
        train, val: subject names (default: every image but the atlas and ``val``; none).
        transform: ``"rigid"`` or ``"affine"`` (:class:`RandomPerturbation`).
        rotation: maximum rotation per component, degrees.
        translation: maximum translation per axis, voxels of the network grid.
        scale, shear: affine only.
        length: training items (random perturbations drawn from the subjects).
        val_pairs: perturbations per validation subject (fixed draws).
        seed: seed of the draws (validation uses ``seed + 1``).
    """

    images: str
    labels: str | None = None
    atlas: str | None = None
    train: list[str] | None = None
    val: list[str] | None = None
    transform: str = "rigid"
    rotation: float = 10.0
    translation: float = 4.0
    scale: float = 0.1
    shear: float = 0.05
    length: int = 10_000
    val_pairs: int = 2
    seed: int = 0

    @classmethod
    def from_dict(cls, options: dict) -> PerturbOptions:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InputError(
                f"unknown config key {', '.join('data.synthetic.' + k for k in unknown)} of "
                f"kind perturb; valid keys: kind, {', '.join(known)}"
            )
        if "images" not in options:
            raise InputError("config data.synthetic (kind perturb) needs images, a folder")
        out = cls(**options)
        if out.transform not in KINDS:
            raise InputError(
                f"config data.synthetic.transform must be one of {KINDS}, got {out.transform!r}"
            )
        if out.length < 1 or out.val_pairs < 1:
            raise InputError("config data.synthetic: length and val_pairs must be >= 1")
        return out


@register_source("perturb")
def perturbed_datasets(
    options: dict, preprocessor: Preprocessor
) -> tuple[PerturbedPairs, PerturbedPairs | None]:
    """Training and validation pairs of real images moved by known random rigid or affine
    transforms, on the network grid of ``preprocessor`` (derived from the atlas, or the first
    training subject). Options: :class:`PerturbOptions`."""
    o = PerturbOptions.from_dict(dict(options))
    try:
        pert = RandomPerturbation(
            o.transform, o.rotation, o.translation, o.scale, o.shear, self_pairs=o.atlas is None
        )
    except ValueError as e:
        raise InputError(f"config data.synthetic: {e}") from None
    exclude = set(o.val or []) | ({o.atlas} if o.atlas else set())
    names = o.train
    if names is None:
        names = [n for n in folder_subjects(o.images, o.labels) if n not in exclude]
    train = list(folder_subjects(o.images, o.labels, names).values())
    val = list(folder_subjects(o.images, o.labels, o.val).values()) if o.val else []
    if not train:
        raise InputError("config data.synthetic (kind perturb): no training images")

    def pairs(subjects):
        if o.atlas is None:
            return [Pair.of(s, s, name=s.name) for s in subjects]
        atlas = next(iter(folder_subjects(o.images, o.labels, [o.atlas]).values()))
        return atlas_pairs(atlas, subjects)

    base = PairDataset(pairs(train), preprocessor)
    train_set = PerturbedPairs(base, pert, o.seed, o.length, base.grid, preprocessor)
    val_set = None
    if val:
        vbase = PairDataset(pairs(val), preprocessor, grid=base.grid)
        val_set = PerturbedPairs(
            vbase, pert, o.seed + 1, o.val_pairs * len(vbase), base.grid, preprocessor
        )
    return train_set, val_set
