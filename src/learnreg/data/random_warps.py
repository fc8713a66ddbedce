"""Random synthetic affine, thin-plate-spline and dense smooth warps of real 2D images and 3D
volumes.

Supervised networks that regress global or low-dimensional transforms (Rocco et al. 2017's
geometric matching, Eppenhof et al. 2018's TPS regression, Lin & Lucey 2017's IC-STN) or a
dense field (Dosovitskiy et al. 2015's FlowNet, Sokooti et al. 2017's RegNet) train on pairs
made from one real image and a random transform ``T`` whose parameters are the answer. In this package's convention (``ARCHITECTURE.md``) ``T`` maps fixed points to moving
points, so a pair is (as DeTone's protocol in :mod:`learnreg.data.synthetic`):

- ``moving``: a crop of the source image at position ``p``: ``moving(y) = I(p + y)``;
- ``fixed``: the source image sampled through ``T``: ``fixed(x) = I(p + T(x))`` (linear
  interpolation, zero outside the source image), so that ``moving(T(x)) = fixed(x)``;
- ``target``: ``T``'s parameters, in **voxel index coordinates** of the crop grid:

  * ``"affine"``: :class:`~learnreg.spatial.linear.Affine` parameters ``[L − I | t]``
    row-major ``(D(D+1),)`` about the crop centre ``c = Grid.index_center = (S − 1)/2``:
    ``T(x) = L (x − c) + c + t`` (:func:`learnreg.methods.geometric_matching.affine_matrix`;
    drawn by :func:`learnreg.data.perturb.random_affine_params`);
  * ``"tps"``: displacements ``(K, D)`` (voxels) of a regular grid of ``K`` control points
    (``Grid(shape).index_lattice(grid_size)``: ``grid_size`` points per axis from the first to
    the last voxel centre, last axis fastest), each component uniform in ``±magnitude``;
    ``T`` is the thin-plate spline (:class:`~learnreg.spatial.tps.ThinPlateSpline`) through
    ``p_k ↦ p_k + δ_k`` (:class:`learnreg.methods.tps_regression.TPSGrid`).
  * ``"affine+tps"``: ``T = A ∘ S``, a thin-plate spline ``S`` then an affine ``A``
    (fixed → moving: the moving image is an affine of the fixed one after a local
    deformation; Rocco et al. chain an affine network and a TPS network on such pairs); the
    target is both parameter sets flattened into one vector: the ``D(D+1)`` affine
    parameters, then the ``K·D`` control displacements (:func:`split_affine_tps`);
  * ``"dense"``: the displacement ``T(x) − x`` ``(D, *S)`` (voxels) at every voxel of the crop,
    ``T(x) = A(x) + u(x)``: a random affine ``A`` (the ``"affine"`` ranges; zero ranges for
    none) plus a smooth field ``u`` that sums cubic B-spline fields of several control
    spacings, each coefficient uniform in ``±magnitude`` of its spacing
    (:func:`random_smooth_displacement`): low and high frequencies, small and large
    magnitudes, as Sokooti et al.'s generator and, with the affine, in the spirit of
    FlowNet's Flying Chairs (random affine motions of real images).

With a source image larger than the crop (2D photographs) the crop position is random and
keeps ``margin`` voxels from the border, so ``T(x)`` mostly stays inside the image (Rocco et
al. warp the whole image and take the central crop of both). With a source of exactly the
crop size (3D brain volumes, whose background is zero) the crop is the whole volume.

Sources: :func:`learnreg.data.synthetic.source_images` (2D photographs, brain slices, an image
folder) and :func:`lpba_volumes` (LPBA40 T1 volumes put on a coarse RAS grid in physical
space, as the recorded preprocessing puts any new volume at prediction time).
``learnreg train`` builds these pairs by name (:func:`warp_source`, ``data.synthetic: {kind:
warp, ...}``): every dataset has the network ``grid`` of its items (the crop grid of 2D images;
the physical 4–8 mm grid of the LPBA40 volumes) and the ``preprocessor`` that puts a new pair
on it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.core.options import check_option
from learnreg.data.perturb import random_affine_params
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.data.sources import register_source
from learnreg.data.synthetic import IMAGE_SOURCES, normalized, source_images, source_options
from learnreg.methods.geometric_matching import affine_matrix, split_affine_tps
from learnreg.methods.tps_regression import TPSGrid
from learnreg.spatial.sampling import sample_index
from learnreg.spatial.tps import ThinPlateSpline

__all__ = [
    "WARP_KINDS",
    "LPBA_TRAIN",
    "LPBA_HELDOUT",
    "random_tps_displacements",
    "random_smooth_displacement",
    "tps_points",
    "affine_points",
    "split_affine_tps",
    "lpba_volumes",
    "RandomWarpPairs",
    "warp_source",
]

WARP_KINDS = ("affine", "tps", "dense", "affine+tps")
#: LPBA40's suggested split (README of the data): S11–S34 train, S35–S40 validation.
LPBA_TRAIN = tuple(f"S{i:02d}" for i in range(11, 35))
LPBA_HELDOUT = tuple(f"S{i:02d}" for i in range(35, 41))
_DEFAULT_DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    s = tuple(int(v) for v in shape)
    if len(s) not in (2, 3) or any(v < 2 for v in s):
        raise ValueError(f"shape must be 2 or 3 sizes >= 2, got {tuple(shape)}")
    return s


def _grid_size(grid_size: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    g = (int(grid_size),) * ndim if isinstance(grid_size, int) else tuple(int(v) for v in grid_size)
    if len(g) != ndim or any(v < 2 for v in g):
        raise ValueError(f"grid_size must be an int or {ndim} ints >= 2, got {grid_size!r}")
    return g


def random_tps_displacements(
    n: int,
    num_points: int,
    ndim: int,
    magnitude: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` random control-point displacements ``(n, K, D)``, each component uniform in
    ``±magnitude`` voxels (float32)."""
    if n < 1 or num_points < 1 or ndim not in (2, 3):
        raise ValueError(
            f"need n >= 1, num_points >= 1 and ndim in (2, 3); got {n}, {num_points}, {ndim}"
        )
    if not magnitude >= 0:
        raise ValueError(f"magnitude must be >= 0, got {magnitude}")
    u = torch.rand(n, num_points, ndim, generator=generator, dtype=torch.float64)
    return ((u * 2 - 1) * magnitude).float()


def random_smooth_displacement(
    shape: Sequence[int],
    spacings: Sequence[int],
    magnitudes: Sequence[float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random smooth displacement ``(D, *shape)`` (voxels, float64): the sum over
    ``(spacing, magnitude)`` pairs of cubic B-spline fields (control points every ``spacing``
    voxels, :func:`learnreg.spatial.bspline.evaluate_bspline`) whose coefficients are uniform
    in ``±magnitude``; each component of each field stays within ``±magnitude`` (B-spline
    weights are a partition of unity)."""
    from learnreg.spatial.bspline import control_lattice_shape, evaluate_bspline

    s = _check_shape(shape)
    if len(spacings) != len(magnitudes) or not spacings:
        raise ValueError(
            "random_smooth_displacement: give one magnitude per spacing; got spacings "
            f"{list(spacings)} and magnitudes {list(magnitudes)}"
        )
    field = torch.zeros(len(s), *s, dtype=torch.float64)
    for spacing, magnitude in zip(spacings, magnitudes, strict=True):
        if int(spacing) < 1 or not float(magnitude) >= 0:
            raise ValueError(
                f"random_smooth_displacement: spacings must be >= 1 voxel and magnitudes >= 0;"
                f" got {spacing} and {magnitude}"
            )
        sp = (int(spacing),) * len(s)
        lattice = control_lattice_shape(s, sp)
        u = torch.rand(1, len(s), *lattice, generator=generator, dtype=torch.float64)
        field += evaluate_bspline((u * 2 - 1) * float(magnitude), sp, s)[0]
    return field


@functools.lru_cache(maxsize=4)
def _tps_grid(shape: tuple[int, ...], grid_size: tuple[int, ...]) -> TPSGrid:
    """The TPS design of a crop grid (shared by the training and validation sets)."""
    return TPSGrid(shape, grid_size)


def tps_points(
    displacements: torch.Tensor,
    shape: Sequence[int],
    grid_size: int | Sequence[int],
    points: torch.Tensor,
) -> torch.Tensor:
    """``T(points)`` for the thin-plate splines through the control grid of ``shape``
    (``Grid(shape).index_lattice(grid_size)``) displaced by ``displacements`` ``(N, K, D)``;
    ``points`` ``(N or 1, P, D)`` index coordinates; float64 result ``(N, P, D)``."""
    s = _check_shape(shape)
    cp = Grid(s).index_lattice(_grid_size(grid_size, len(s)), torch.float64, displacements.device)
    if displacements.dim() != 3 or displacements.shape[1:] != cp.shape:
        raise ValueError(
            f"displacements must be (N, {cp.shape[0]}, {len(s)}) for a {grid_size} control "
            f"grid; got {tuple(displacements.shape)}"
        )
    tps = ThinPlateSpline(cp[None], cp[None] + displacements.double())
    return tps(points.double())


def affine_points(params: torch.Tensor, shape: Sequence[int], points: torch.Tensor) -> torch.Tensor:
    """``T(points)`` for :class:`~learnreg.spatial.linear.Affine` parameters ``(N, D(D+1))``
    about the centre of a grid of ``shape``; ``points`` ``(N or 1, P, D)``; float64."""
    m = affine_matrix(params.double(), _check_shape(shape))
    d = m.shape[-1] - 1
    return points.double() @ m[:, :d, :d].transpose(1, 2) + m[:, None, :d, d]


def _lpba_folder(folder: str | os.PathLike | None) -> Path:
    if folder is None:
        env = os.environ.get("LEARNREG_DATA")
        return (Path(env) if env else _DEFAULT_DATA) / "lpba40"
    return Path(folder)


def _read_lpba(name: str, folder: Path) -> Image:
    from learnreg.io.images import read_image

    path = folder / "images" / f"{name}.nii.gz"
    if not path.is_file():
        raise InputError(f"{path}: LPBA40 volume not found (set LEARNREG_DATA or folder)")
    return read_image(path)


def lpba_volumes(
    names: Sequence[str] = LPBA_TRAIN,
    factor: int = 4,
    folder: str | os.PathLike | None = None,
    preprocessor: Preprocessor | None = None,
    grid: Grid | None = None,
) -> dict[str, Image]:
    """LPBA40 T1 volumes ``name → Image`` on one coarse network grid in physical space.

    Each volume is put on the grid by ``preprocessor`` (:meth:`~learnreg.data.preprocess.
    Preprocessor.image`: intensity normalization, anti-aliasing blur, linear resampling in
    world space) exactly as a new volume is at prediction time. Default: a RAS grid of
    ``factor`` mm (160×192×160 at 1 mm → 40×48×40 at 4 mm for ``factor=4``) over the field of
    view, no intensity normalization (the volumes are in [0, 1]); a given ``preprocessor``'s
    network grid (its shape, spacing, orientation) over the first volume's field of view is
    used instead, or ``grid`` itself when given. ``folder``: the ``lpba40`` data folder
    (default ``$LEARNREG_DATA/lpba40``, else the shared data folder next to the repository).
    Before this redesign the volumes were area-averaged ``factor``× in storage order (LAS);
    now they are what prediction makes of a new volume (RAS, Gaussian anti-aliasing).
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if not names:
        raise ValueError("lpba_volumes: no subjects")
    root = _lpba_folder(folder)
    first = _read_lpba(names[0], root)
    if preprocessor is None:
        shape = tuple(max(1, s // factor) for s in first.grid.shape)
        preprocessor = Preprocessor(NetworkGrid(shape=shape), percentiles=None)
    grid = preprocessor.grid_for(first) if grid is None else grid
    out = {}
    for name in names:
        image = first if name == names[0] else _read_lpba(name, root)
        out[name] = preprocessor.image(image, grid)
    return out


def lpba_atlas_source(
    kind: str, o: dict, preprocessor: Preprocessor
) -> tuple[Path, str, list[str], list[str], Preprocessor]:
    """What an LPBA40 atlas → subject source ``kind`` reads from its resolved options ``o``
    (``folder``, ``atlas``, ``subjects``, ``val_subjects``): ``(root, atlas, subjects,
    validation subjects, the preprocessor of the training grid)`` — ``data.shape`` /
    ``data.spacing`` over the atlas's field of view, which must be set."""
    net = preprocessor.network
    if net.shape is None:
        raise InputError(f"config data.synthetic ({kind}): set data.shape (the grid)")
    subjects = list(o["subjects"] if o["subjects"] is not None else LPBA_TRAIN)
    held = list(o["val_subjects"] if o["val_subjects"] is not None else LPBA_HELDOUT)
    pre = Preprocessor(
        NetworkGrid(tuple(net.shape), net.spacing, net.orientation, 0),
        preprocessor.percentiles,
        preprocessor.antialias,
    )
    return _lpba_folder(o["folder"]), str(o["atlas"]), subjects, held, pre


def read_lpba_labelled(root: Path, names: Sequence[str]) -> tuple[dict, dict]:
    """``(images, label maps)`` ``name → Image`` of LPBA40 subjects as stored (1 mm)."""
    from learnreg.io.images import read_image, read_labels

    images, labels = {}, {}
    for n in dict.fromkeys(names):
        path, lab = root / "images" / f"{n}.nii.gz", root / "labels" / f"{n}.nii.gz"
        if not path.is_file() or not lab.is_file():
            raise InputError(f"{path}: LPBA40 image or label map not found")
        images[n], labels[n] = read_image(path), read_labels(lab)
    return images, labels


def prediction_preprocessor(training: Preprocessor, grid: Grid) -> Preprocessor:
    """How prediction puts a new image on a network grid like ``grid``: its shape and spacing
    over the new fixed image's field of view."""
    net = training.network
    return Preprocessor(
        NetworkGrid(tuple(net.shape), grid.spacing, net.orientation, 0),
        training.percentiles,
        training.antialias,
    )


class RandomWarpPairs(Dataset):
    """Pairs ``(fixed = I ∘ T, moving = I)`` of real images and random affine or TPS ``T``.

    Args:
        images: ``name → (*S)`` grayscale images (2D or 3D, all of the same dimension), each at
            least ``shape`` in every axis; tensors, or :class:`~learnreg.core.Image` s on one
            grid (e.g. :func:`lpba_volumes`).
        kind: ``"affine"``, ``"tps"``, ``"affine+tps"`` or ``"dense"`` (module docstring).
        shape: the crop (network input) size; default: the size of the first image.
        length: number of items; item ``i`` is a pure function of ``(seed, i)``.
        rotation, translation, scale, shear: affine ranges (degrees, voxels, fractions) of
            :func:`learnreg.data.perturb.random_affine_params`.
        grid_size: TPS control points per axis (Rocco: 3 in 2D; Eppenhof: 6 in 3D).
        magnitude: maximum TPS control-point displacement per component, voxels.
        field_spacings, field_magnitudes: the B-spline fields of ``"dense"`` warps
            (:func:`random_smooth_displacement`; voxels).
        fixed_border: keep the control points on the grid's border in place (zero
            displacement), so the deformation fades out towards the image border — with a
            whole brain volume as the crop they lie in the background, where nothing shows
            their displacement.
        margin: the crop keeps this many voxels from the source image's border where the
            image is large enough (default ``translation + magnitude``-ish: ``max(S) / 8``).
        seed: seed of the whole set.
        grid: the network grid of the items (:attr:`grid`); default: the images' own grid
            when they are :class:`~learnreg.core.Image` s of the crop size (the whole volume),
            else the unit grid of the crop.
        preprocessor: how a new pair is put on that grid at prediction time (its network
            shape must be ``shape``); default: a grid of ``shape`` over the fixed image's field
            of view (at :attr:`grid`'s spacing when the images are :class:`Image` s), no
            intensity normalization.

    Items: ``{"fixed", "moving"}`` ``(1, *shape)`` float32, ``"target"`` (module docstring;
    ``(D(D+1),)``, ``(K, D)`` or ``(D, *shape)``), ``"origin"`` the crop position ``(D,)``, ``"index"``,
    ``"names"``; :func:`learnreg.data.datasets.collate_pairs` stacks them into a
    ``RegistrationBatch`` with ``target``. :attr:`grid` and :attr:`preprocessor` describe
    the network grid, as the trainer expects.
    """

    has_labels = False

    def __init__(
        self,
        images: Mapping[str, torch.Tensor | Image],
        kind: str = "affine",
        shape: Sequence[int] | None = None,
        length: int = 1000,
        *,
        rotation: float = 15.0,
        translation: float = 4.0,
        scale: float = 0.15,
        shear: float = 0.1,
        grid_size: int | Sequence[int] = 3,
        magnitude: float = 3.0,
        fixed_border: bool = False,
        field_spacings: Sequence[int] = (16, 8),
        field_magnitudes: Sequence[float] = (3.0, 1.5),
        margin: int | None = None,
        seed: int = 0,
        grid: Grid | None = None,
        preprocessor: Preprocessor | None = None,
    ) -> None:
        check_option("kind", kind, WARP_KINDS)
        if not images:
            raise ValueError("RandomWarpPairs: no images")
        if length < 1:
            raise ValueError(f"RandomWarpPairs: length must be >= 1, got {length}")
        self.names = list(images)
        grids = [im.grid for im in images.values() if isinstance(im, Image)]
        self.images = [
            (im.data[0] if isinstance(im, Image) else torch.as_tensor(im)).float().contiguous()
            for im in images.values()
        ]
        ndim = self.images[0].dim()
        if ndim not in (2, 3) or any(im.dim() != ndim for im in self.images):
            raise ValueError(
                "RandomWarpPairs: images must all be 2D or all 3D, got shapes "
                f"{[tuple(im.shape) for im in self.images]}"
            )
        self.shape = _check_shape(self.images[0].shape if shape is None else shape)
        if len(self.shape) != ndim:
            raise ValueError(f"shape {self.shape} is not {ndim}D like the images")
        for n, im in zip(self.names, self.images, strict=True):
            if any(a < b for a, b in zip(im.shape, self.shape, strict=True)):
                raise ValueError(
                    f"RandomWarpPairs: image {n!r} of size {tuple(im.shape)} is smaller than "
                    f"shape {self.shape}"
                )
        self.kind, self.ndim, self.length, self.seed = kind, ndim, int(length), int(seed)
        self.affine = {
            "rotation": rotation,
            "translation": translation,
            "scale": scale,
            "shear": shear,
        }
        random_affine_params(1, ndim, **self.affine)  # validates the ranges
        self.grid_size = _grid_size(grid_size, ndim)
        self.magnitude = float(magnitude)
        self.fixed_border = bool(fixed_border)
        if self.fixed_border and min(self.grid_size) < 3:
            raise ValueError(f"fixed_border needs grid_size >= 3, got {self.grid_size}")
        if not self.magnitude >= 0:
            raise ValueError(f"magnitude must be >= 0, got {magnitude}")
        self.field_spacings = tuple(int(v) for v in field_spacings)
        self.field_magnitudes = tuple(float(v) for v in field_magnitudes)
        if kind == "dense":  # validates
            random_smooth_displacement((4,) * ndim, self.field_spacings, self.field_magnitudes)
        self.margin = max(self.shape) // 8 if margin is None else int(margin)
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if grid is None:
            whole = len(grids) == len(self.images) and grids[0].shape == self.shape
            if whole and not all(g.allclose(grids[0]) for g in grids):
                raise ValueError("RandomWarpPairs: the images lie on different grids")
            grid = grids[0] if whole else Grid(self.shape)
        if tuple(grid.shape) != self.shape:
            raise ValueError(f"RandomWarpPairs: grid {grid.shape} is not the crop {self.shape}")
        self.grid = grid
        if preprocessor is None:
            spacing = grid.spacing if grids else None
            preprocessor = Preprocessor(NetworkGrid(self.shape, spacing), percentiles=None)
        if preprocessor.network.shape != self.shape:
            raise ValueError(
                f"RandomWarpPairs: the preprocessor's network shape "
                f"{preprocessor.network.shape} is not the crop {self.shape}"
            )
        self.preprocessor = preprocessor
        self._points = Grid(self.shape).index_points(torch.float64).reshape(1, -1, ndim)

    def __len__(self) -> int:
        return self.length

    @property
    def num_control_points(self) -> int:
        k = 1
        for g in self.grid_size:
            k *= g
        return k

    def inner_mask(self) -> torch.Tensor:
        """``(K,)`` float mask of the control points not on the grid's border."""
        idx = Grid(self.grid_size).index_points(torch.float64).reshape(-1, self.ndim)
        size = torch.tensor(self.grid_size, dtype=torch.float64)
        return ((idx > 0) & (idx < size - 1)).all(-1).float()

    def draw(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The random choices of item ``index``: source image, crop origin ``(D,)`` and the
        transform's parameters (the item's ``target``)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        k = int(torch.randint(len(self.images), (1,), generator=g))
        size = self.images[k].shape
        origin = []
        for n, s in zip(size, self.shape, strict=True):
            lo = min(self.margin, (n - s) // 2)
            origin.append(int(torch.randint(lo, n - s - lo + 1, (1,), generator=g)))
        if self.kind == "affine":
            params = random_affine_params(1, self.ndim, generator=g, **self.affine)[0]
        elif self.kind == "dense":
            affine = random_affine_params(1, self.ndim, generator=g, **self.affine)
            smooth = random_smooth_displacement(
                self.shape, self.field_spacings, self.field_magnitudes, g
            )
            mapped = affine_points(affine, self.shape, self._points)  # (1, P, D)
            linear = (mapped - self._points)[0].T.reshape(self.ndim, *self.shape)
            params = (linear + smooth).float()
        else:
            affine = (
                random_affine_params(1, self.ndim, generator=g, **self.affine)[0]
                if self.kind == "affine+tps"
                else None
            )
            params = random_tps_displacements(
                1, self.num_control_points, self.ndim, self.magnitude, g
            )[0]
            if self.fixed_border:
                params = params * self.inner_mask()[:, None]
            if affine is not None:
                params = torch.cat([affine, params.flatten()])
        return k, torch.tensor(origin, dtype=torch.float64), params

    def transform_points(self, params: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """``T(points)`` ``(N, P, D)`` (float64) for a batch of targets ``params``."""
        if self.kind == "affine":
            return affine_points(params, self.shape, points)
        if self.kind == "affine+tps":
            affine, tps = split_affine_tps(params, self.ndim)
            return affine_points(
                affine, self.shape, tps_points(tps, self.shape, self.grid_size, points)
            )
        if self.kind == "dense":  # the field, linearly interpolated at the points
            n, p = points.shape[0], points.shape[1]
            at = points.double().reshape(n, p, *([1] * (self.ndim - 1)), self.ndim)
            u = sample_index(params.double(), at.expand(params.shape[0], *at.shape[1:]))
            return points.double() + u.reshape(params.shape[0], self.ndim, p).transpose(1, 2)
        return tps_points(params, self.shape, self.grid_size, points)

    def _crop_points(self, params: torch.Tensor) -> torch.Tensor:
        """``T(x)`` ``(1, P, D)`` of every voxel ``x`` of the crop grid (float64)."""
        if self.kind == "affine":
            return affine_points(params[None], self.shape, self._points)
        if self.kind == "dense":
            return self._points + params.double().flatten(1).T[None]
        affine, tps = (
            split_affine_tps(params[None], self.ndim)
            if self.kind == "affine+tps"
            else (None, params[None])
        )
        # the spline's dense field by the TPS design of the crop grid (computed once)
        u = _tps_grid(self.shape, self.grid_size).dense(tps.float())
        mapped = self._points + u.flatten(2).transpose(1, 2).double()
        return mapped if affine is None else affine_points(affine, self.shape, mapped)

    def __getitem__(self, index: int) -> dict:
        k, origin, params = self.draw(index)
        image = self.images[k][None, None]
        mapped = self._crop_points(params) + origin
        fixed = sample_index(image.double(), mapped.reshape(1, *self.shape, self.ndim))
        sl = tuple(slice(int(o), int(o) + s) for o, s in zip(origin, self.shape, strict=True))
        moving = self.images[k][sl][None]
        name = self.names[k]
        return {
            "fixed": fixed[0].float().contiguous(),
            "moving": moving.contiguous(),
            "target": params.float(),
            "origin": origin.float(),
            "index": int(index),
            "names": (name, name),
        }


_WARP_DEFAULTS = {
    "transform": "affine",
    "images": "photos",
    "val_images": None,
    "image_size": [144, 192],
    "folder": None,
    "subjects": None,
    "val_subjects": None,
    "length": 10**6,
    "seed": 0,
    "val_length": 64,
    "val_seed": None,
    "rotation": 15.0,
    "translation": 4.0,
    "scale": 0.15,
    "shear": 0.1,
    "grid_size": 3,
    "magnitude": 3.0,
    "fixed_border": False,
    "field_spacings": [16, 8],
    "field_magnitudes": [3.0, 1.5],
    "margin": None,
}


@register_source("warp")
def warp_source(
    options: dict, preprocessor: Preprocessor
) -> tuple[RandomWarpPairs, RandomWarpPairs | None]:
    """``data.synthetic: {kind: warp, ...}``: random affine / TPS warps of real images.

    Keys (defaults): ``transform`` (``affine``, ``tps`` or ``dense``), ``images`` (``photos``, ``brains``,
    ``both``, ``lpba40`` or a 2D image folder), ``val_images`` (default: the held-out split of
    a named source, none for a folder; ``false``: no validation), ``image_size`` (2D sources
    are resized to it, [144, 192]), ``folder`` (of the brain slices / the ``lpba40`` folder),
    ``subjects`` / ``val_subjects`` (LPBA40: :data:`LPBA_TRAIN` / :data:`LPBA_HELDOUT`),
    ``length`` (10⁶), ``seed`` (0), ``val_length`` (64), ``val_seed`` (``seed + 1``) and the
    warp ranges of :class:`RandomWarpPairs` (``rotation``, ``translation``, ``scale``,
    ``shear``, ``grid_size``, ``magnitude``, ``fixed_border``, ``field_spacings``,
    ``field_magnitudes``, ``margin``).

    The crop is the network grid: ``data.shape`` or the method's input shape. 2D images are
    cropped at random on a unit grid of that shape; LPBA40 volumes are put whole on the network
    grid in physical space (``data.spacing``, default the field of view / shape, e.g. 4 mm for
    40×48×40; RAS unless ``data.orientation: native``) by the same preprocessing that prediction
    records. Intensities are normalized with ``data.percentiles`` as inputs are at prediction.
    """
    o = source_options("warp", options, _WARP_DEFAULTS)
    check_option("config data.synthetic.transform", o["transform"], WARP_KINDS, InputError)
    net = preprocessor.network
    if net.shape is None:
        raise InputError(
            "config data.synthetic (warp): the crop is the network grid: set data.shape "
            "(or use a fixed-size method)"
        )
    shape = tuple(net.shape)
    warp = {
        k: o[k]
        for k in (
            "rotation",
            "translation",
            "scale",
            "shear",
            "grid_size",
            "magnitude",
            "fixed_border",
            "field_spacings",
            "field_magnitudes",
            "margin",
        )
    }
    for key in ("grid_size", "field_spacings", "field_magnitudes"):
        if isinstance(warp[key], list):
            warp[key] = tuple(warp[key])
    seed = int(o["seed"])
    val_seed = seed + 1 if o["val_seed"] is None else int(o["val_seed"])
    try:
        if o["images"] == "lpba40":
            if len(shape) != 3:
                raise ValueError(f"LPBA40 volumes need a 3D network grid, got {shape}")
            pre = Preprocessor(
                NetworkGrid(shape, net.spacing, net.orientation, 0),
                preprocessor.percentiles,
                preprocessor.antialias,
            )
            subjects = list(o["subjects"] or LPBA_TRAIN)
            vols = lpba_volumes(subjects, folder=o["folder"], preprocessor=pre)
            grid = next(iter(vols.values())).grid
            # at prediction: the training resolution over the fixed image's field of view
            pre = Preprocessor(
                NetworkGrid(shape, grid.spacing, net.orientation, 0),
                preprocessor.percentiles,
                preprocessor.antialias,
            )
            opts = {"seed": seed, "grid": grid, "preprocessor": pre, **warp}
            train = RandomWarpPairs(vols, o["transform"], shape, int(o["length"]), **opts)
            val = None
            if o["val_images"] is not False and int(o["val_length"]) > 0:
                held = list(o["val_subjects"] or LPBA_HELDOUT)
                vols = lpba_volumes(held, folder=o["folder"], preprocessor=pre, grid=grid)
                opts["seed"] = val_seed
                val = RandomWarpPairs(vols, o["transform"], shape, int(o["val_length"]), **opts)
            return train, val
        if len(shape) != 2:
            raise ValueError(f"2D image sources need a 2D network grid, got {shape}")
        pre = Preprocessor(
            NetworkGrid(shape, net.spacing, net.orientation, 0),
            preprocessor.percentiles,
            preprocessor.antialias,
        )
        size = None if o["image_size"] is None else tuple(o["image_size"])
        opts = {"seed": seed, "preprocessor": pre, **warp}
        images = normalized(source_images(o["images"], "train", size, o["folder"]), pre.percentiles)
        train = RandomWarpPairs(images, o["transform"], shape, int(o["length"]), **opts)
        val_source = o["val_images"]
        if val_source is None and str(o["images"]) in IMAGE_SOURCES:
            val_source = o["images"]
        val = None
        if val_source not in (None, False) and int(o["val_length"]) > 0:
            held = normalized(
                source_images(val_source, "heldout", size, o["folder"]), pre.percentiles
            )
            opts["seed"] = val_seed
            val = RandomWarpPairs(held, o["transform"], shape, int(o["val_length"]), **opts)
        return train, val
    except ValueError as e:
        raise InputError(f"config data.synthetic (warp): {e}") from None
