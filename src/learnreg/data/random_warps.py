"""Random synthetic affine and thin-plate-spline warps of real 2D images and 3D volumes.

Supervised networks that regress global or low-dimensional transforms (Rocco et al. 2017's
geometric matching, Eppenhof et al. 2018's TPS regression, Lin & Lucey 2017's IC-STN) train
on pairs made from one real image and a random transform ``T`` whose parameters are the
answer. In this package's convention (``ARCHITECTURE.md``) ``T`` maps fixed points to moving
points, so a pair is (as DeTone's protocol in :mod:`learnreg.data.synthetic`):

- ``moving``: a crop of the source image at position ``p``: ``moving(y) = I(p + y)``;
- ``fixed``: the source image sampled through ``T``: ``fixed(x) = I(p + T(x))`` (linear
  interpolation, zero outside the source image), so that ``moving(T(x)) = fixed(x)``;
- ``target``: ``T``'s parameters, in **voxel index coordinates** of the crop grid:

  * ``"affine"``: :class:`~learnreg.spatial.linear.Affine` parameters ``[L − I | t]``
    row-major ``(D(D+1),)`` about the crop centre ``c = (S − 1)/2``:
    ``T(x) = L (x − c) + c + t`` (:mod:`learnreg.data.perturb`'s convention; drawn by
    :func:`learnreg.data.perturb.random_affine_params`);
  * ``"tps"``: displacements ``(K, D)`` (voxels) of a regular grid of ``K`` control points
    (:func:`control_points`: ``grid_size`` points per axis from the first to the last voxel
    centre), each component uniform in ``±magnitude``; ``T`` is the thin-plate spline
    (:class:`~learnreg.spatial.tps.ThinPlateSpline`) through ``p_k ↦ p_k + δ_k``.

With a source image larger than the crop (2D photographs) the crop position is random and
keeps ``margin`` voxels from the border, so ``T(x)`` mostly stays inside the image (Rocco et
al. warp the whole image and take the central crop of both). With a source of exactly the
crop size (3D brain volumes, whose background is zero) the crop is the whole volume.

Sources: :func:`learnreg.data.synthetic.photo_images` / :func:`~learnreg.data.synthetic.
brain_slice_images` (2D) and :func:`lpba_volumes` (LPBA40 T1 volumes, area-downsampled).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.data.perturb import params_to_matrix, random_affine_params
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.spatial.sampling import sample_index
from learnreg.spatial.tps import ThinPlateSpline, tps_kernel

__all__ = [
    "WARP_KINDS",
    "LPBA_TRAIN",
    "LPBA_HELDOUT",
    "control_points",
    "random_tps_displacements",
    "tps_points",
    "affine_points",
    "lpba_volumes",
    "RandomWarpPairs",
]

WARP_KINDS = ("affine", "tps")
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


def control_points(
    shape: Sequence[int],
    grid_size: int | Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A regular grid of control points ``(K, D)`` in index coordinates of a grid of ``shape``:
    ``grid_size`` points per axis from the first (0) to the last voxel centre (``S − 1``),
    ordered as ``Grid(grid_size).index_points`` (last axis fastest); ``K = prod(grid_size)``."""
    s = _check_shape(shape)
    g = _grid_size(grid_size, len(s))
    axes = [
        torch.linspace(0, n - 1, k, dtype=dtype, device=device) for n, k in zip(s, g, strict=True)
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(s))


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


def tps_points(
    displacements: torch.Tensor,
    shape: Sequence[int],
    grid_size: int | Sequence[int],
    points: torch.Tensor,
) -> torch.Tensor:
    """``T(points)`` for the thin-plate splines through the control grid of ``shape``
    displaced by ``displacements`` ``(N, K, D)``; ``points`` ``(N or 1, P, D)`` index
    coordinates; float64 result ``(N, P, D)``."""
    s = _check_shape(shape)
    cp = control_points(s, grid_size, torch.float64, displacements.device)
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
    m = params_to_matrix(params.double(), "affine", _check_shape(shape))
    d = m.shape[-1] - 1
    return points.double() @ m[:, :d, :d].transpose(1, 2) + m[:, None, :d, d]


def lpba_volumes(
    names: Sequence[str] = LPBA_TRAIN,
    factor: int = 4,
    folder: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """LPBA40 T1 volumes ``name → (X, Y, Z)`` in [0, 1], area-averaged by ``factor``
    (160×192×160 at 1 mm → 40×48×40 at 4 mm for ``factor=4``).

    ``folder``: the ``lpba40`` data folder (default ``$LEARNREG_DATA/lpba40``, else the shared
    data folder next to the repository).
    """
    from learnreg.io.images import read_image

    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if folder is None:
        env = os.environ.get("LEARNREG_DATA")
        folder = (Path(env) if env else _DEFAULT_DATA) / "lpba40"
    out = {}
    for name in names:
        path = Path(folder) / "images" / f"{name}.nii.gz"
        if not path.is_file():
            raise InputError(f"{path}: LPBA40 volume not found (set LEARNREG_DATA or folder)")
        v = read_image(path).data[None]
        if factor > 1:
            v = F.avg_pool3d(v, factor)
        out[name] = v[0, 0].contiguous()
    return out


class RandomWarpPairs(Dataset):
    """Pairs ``(fixed = I ∘ T, moving = I)`` of real images and random affine or TPS ``T``.

    Args:
        images: ``name → (*S)`` grayscale images (2D or 3D, all of the same dimension), each at
            least ``shape`` in every axis.
        kind: ``"affine"`` or ``"tps"`` (module docstring).
        shape: the crop (network input) size; default: the size of the first image.
        length: number of items; item ``i`` is a pure function of ``(seed, i)``.
        rotation, translation, scale, shear: affine ranges (degrees, voxels, fractions) of
            :func:`learnreg.data.perturb.random_affine_params`.
        grid_size: TPS control points per axis (Rocco: 3 in 2D; Eppenhof: 6 in 3D).
        magnitude: maximum TPS control-point displacement per component, voxels.
        fixed_border: keep the control points on the grid's border in place (zero
            displacement), so the deformation fades out towards the image border — with a
            whole brain volume as the crop they lie in the background, where nothing shows
            their displacement.
        margin: the crop keeps this many voxels from the source image's border where the
            image is large enough (default ``translation + magnitude``-ish: ``max(S) / 8``).
        seed: seed of the whole set.

    Items: ``{"fixed", "moving"}`` ``(1, *shape)`` float32, ``"target"`` (module docstring;
    ``(D(D+1),)`` or ``(K, D)``), ``"origin"`` the crop position ``(D,)``, ``"index"``,
    ``"names"``; :func:`learnreg.data.datasets.collate_pairs` stacks them into a
    ``RegistrationBatch`` with ``target``. :attr:`grid` and :attr:`preprocessor` describe
    the network grid, as the trainer expects.
    """

    has_labels = False

    def __init__(
        self,
        images: Mapping[str, torch.Tensor],
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
        margin: int | None = None,
        seed: int = 0,
    ) -> None:
        if kind not in WARP_KINDS:
            raise ValueError(f"kind must be one of {WARP_KINDS}, got {kind!r}")
        if not images:
            raise ValueError("RandomWarpPairs: no images")
        if length < 1:
            raise ValueError(f"RandomWarpPairs: length must be >= 1, got {length}")
        self.names = list(images)
        self.images = [torch.as_tensor(images[n]).float().contiguous() for n in self.names]
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
        self.margin = max(self.shape) // 8 if margin is None else int(margin)
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.grid = Grid(self.shape)
        self.preprocessor = Preprocessor(NetworkGrid(shape=self.shape), percentiles=None)
        self._points = self.grid.index_points(torch.float64).reshape(1, -1, ndim)
        self._kernel: torch.Tensor | None = None  # TPS kernel U(|x − p_k|) of the crop grid

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
        idx = torch.stack(
            torch.meshgrid(*[torch.arange(g) for g in self.grid_size], indexing="ij"), -1
        ).reshape(-1, self.ndim)
        size = torch.tensor(self.grid_size)
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
        else:
            params = random_tps_displacements(
                1, self.num_control_points, self.ndim, self.magnitude, g
            )[0]
            if self.fixed_border:
                params = params * self.inner_mask()[:, None]
        return k, torch.tensor(origin, dtype=torch.float64), params

    def transform_points(self, params: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """``T(points)`` ``(N, P, D)`` (float64) for a batch of targets ``params``."""
        if self.kind == "affine":
            return affine_points(params, self.shape, points)
        return tps_points(params, self.shape, self.grid_size, points)

    def _crop_points(self, params: torch.Tensor) -> torch.Tensor:
        """``T(x)`` ``(1, P, D)`` of every voxel ``x`` of the crop grid (float64)."""
        if self.kind == "affine":
            return affine_points(params[None], self.shape, self._points)
        # the spline's coefficients from spatial.tps, its kernel at the voxels cached
        cp = control_points(self.shape, self.grid_size, torch.float64)
        if self._kernel is None:
            x = self._points[0]
            r2 = (x.square().sum(1, keepdim=True) - 2 * x @ cp.T + cp.square().sum(1)).clamp_min(0)
            self._kernel = tps_kernel(r2, self.ndim).float()
        w, a = ThinPlateSpline(cp[None], cp[None] + params[None].double()).coefficients()
        x = self._points[0]
        mapped = (self._kernel @ w[0].float()).double() + x @ a[0, 1:] + a[0, :1]
        return mapped[None]

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
