"""X-ray/volume pairs of known pose: DRRs of real 3D volumes, for 2D/3D pose regression.

``data.synthetic: {kind: drr, ...}`` in a training config (:func:`drr_datasets`) puts every
volume of ``images`` on the network grid (the training spacing, RAS, over the first volume's
field of view) and makes each item an X-ray of one of them at a random rigid pose: the
digitally reconstructed radiograph (:func:`learnreg.spatial.projection.drr`) of the volume
placed by the pose ``T(t)`` of the six parameters ``t`` (:func:`learnreg.methods.miao.
pose_matrix`: mm along the detector axes and the beam, degrees about the beam and the detector
axes), the imaging system's isocentre at the network grid's centre. Items are ``fixed`` — the
X-ray ``(1, *detector)`` —, ``moving`` — the volume ``(1, D, H, W)`` on the grid — and
``target`` — ``t`` ``(6,)`` —, collated by :func:`~learnreg.data.datasets.collate_pairs` with
``projection=True``. The datasets carry the imaging system (:attr:`DRRPairs.geometry`); the
trainer checks that it is the method's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.data.datasets import Pair, PairDataset, folder_subjects
from learnreg.data.preprocess import Preprocessor
from learnreg.data.sources import register_source
from learnreg.methods.miao import pose_matrix, random_poses
from learnreg.spatial.projection import ProjectionGeometry, covering_depth, drr

__all__ = ["DRRPairs", "DRROptions", "drr_datasets"]


class DRRPairs(Dataset):
    """X-rays of ``volumes`` at random poses: item ``i`` draws its volume and pose from a
    generator seeded by ``(seed, i, epoch)`` (validation: fixed draws, ``epoch`` 0).

    Args:
        volumes: ``(V, 1, *grid.shape)`` volumes on ``grid``.
        grid: the network grid (3D).
        geometry: the imaging system (3D volumes, 2D detector).
        ranges: pose parameters uniform in ``±ranges`` (mm, mm, mm, °, °, °).
        length: number of items.
        seed: seed of the draws.
        preprocessor: how a new volume is put on ``grid`` (saved in checkpoints).
    """

    projection = True
    """Items pair an X-ray with a volume (``fixed`` is not on :attr:`grid`)."""

    def __init__(
        self,
        volumes: torch.Tensor,
        grid: Grid,
        geometry: ProjectionGeometry,
        ranges: tuple[float, ...],
        length: int,
        seed: int = 0,
        preprocessor: Preprocessor | None = None,
    ) -> None:
        if volumes.dim() != 5 or tuple(volumes.shape[2:]) != tuple(grid.shape):
            raise ValueError(
                f"DRRPairs: volumes must be (V, 1, *{grid.shape}), got {tuple(volumes.shape)}"
            )
        if geometry.ndim != 3:
            raise ValueError("DRRPairs: the X-rays are 2D projections of 3D volumes")
        if length < 1:
            raise ValueError(f"DRRPairs: length must be positive, got {length}")
        random_poses(1, ranges, torch.Generator())  # checks the ranges
        self.volumes, self.grid, self.geometry = volumes, grid, geometry
        self.ranges, self.length, self.seed = tuple(float(r) for r in ranges), int(length), seed
        self.preprocessor = preprocessor
        self.epoch = 0

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
        volume = self.volumes[int(torch.randint(len(self.volumes), (1,), generator=g))]
        params = random_poses(1, self.ranges, g)
        with torch.no_grad():
            pose = pose_matrix(params.double(), self.geometry, self.grid.center)
            xray = drr(volume[None], self.grid, self.geometry, pose.to(volume.dtype))[0]
        return {"fixed": xray, "moving": volume, "target": params[0]}


@dataclass
class DRROptions:
    """Options of ``data.synthetic: {kind: drr, ...}`` (:func:`drr_datasets`).

    Args:
        images: folder of 3D volumes (absolute, or relative to the working directory).
        train, val: volume names (default: every volume but ``val``; none).
        detector, pixel_spacing, source_distance, detector_distance, beam_axis, samples,
            depth: the imaging system (:class:`~learnreg.spatial.projection.
            ProjectionGeometry`; ``depth`` None: :func:`~learnreg.spatial.projection.covering_depth` of the grid); they must
            be the method's (``method_config``), which the trainer checks.
        ranges: maximum |pose parameter| (mm, mm, mm, °, °, °).
        length: training items; val_length: validation items (fixed draws).
        seed: seed of the draws (validation uses ``seed + 1``).
    """

    images: str
    train: list[str] | None = None
    val: list[str] | None = None
    detector: list[int] = dataclasses.field(default_factory=lambda: [32, 32])
    pixel_spacing: float = 8.0
    source_distance: float | None = 700.0
    detector_distance: float = 1000.0
    beam_axis: int = 1
    samples: int = 48
    depth: float | None = None
    ranges: list[float] = dataclasses.field(default_factory=lambda: [10, 10, 20, 6, 6, 6])
    length: int = 10_000
    val_length: int = 16
    seed: int = 0

    @classmethod
    def from_dict(cls, options: dict) -> DRROptions:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InputError(
                f"unknown config key {', '.join('data.synthetic.' + k for k in unknown)} of "
                f"kind drr; valid keys: kind, {', '.join(known)}"
            )
        if "images" not in options:
            raise InputError("config data.synthetic (kind drr) needs images, a folder of volumes")
        out = cls(**options)
        if out.length < 1 or out.val_length < 1:
            raise InputError("config data.synthetic: length and val_length must be >= 1")
        return out

    def geometry(self, grid: Grid) -> ProjectionGeometry:
        """The imaging system, its depth resolved for ``grid``."""
        depth = covering_depth(grid) if self.depth is None else float(self.depth)
        return ProjectionGeometry(
            tuple(self.detector),
            self.pixel_spacing,
            self.source_distance,
            self.detector_distance,
            self.beam_axis,
            self.samples,
            depth,
        )


@register_source("drr")
def drr_datasets(options: dict, preprocessor: Preprocessor) -> tuple[DRRPairs, DRRPairs | None]:
    """Training and validation X-ray/volume pairs of known pose (:class:`DRROptions`)."""
    o = DRROptions.from_dict(dict(options))
    exclude = set(o.val or [])
    names = o.train
    if names is None:
        names = [n for n in folder_subjects(o.images) if n not in exclude]
    train = list(folder_subjects(o.images, None, names).values())
    val = list(folder_subjects(o.images, None, o.val).values()) if o.val else []
    if not train:
        raise InputError("config data.synthetic (kind drr): no training volumes")
    base = PairDataset([Pair.of(s, s, name=s.name) for s in train], preprocessor)
    if base.grid.ndim != 3:
        raise InputError(
            f"config data.synthetic (kind drr): {train[0].image} is {base.grid.ndim}D; DRRs are "
            "projections of 3D volumes"
        )
    try:
        geometry = o.geometry(base.grid)
        random_poses(1, o.ranges, torch.Generator())
    except ValueError as e:
        raise InputError(f"config data.synthetic (kind drr): {e}") from None

    def volumes(ds: PairDataset) -> torch.Tensor:
        return torch.stack([ds[i]["moving"] for i in range(len(ds))])

    train_set = DRRPairs(
        volumes(base), base.grid, geometry, o.ranges, o.length, o.seed, preprocessor
    )
    val_set = None
    if val:
        vbase = PairDataset([Pair.of(s, s, name=s.name) for s in val], preprocessor, base.grid)
        val_set = DRRPairs(
            volumes(vbase), base.grid, geometry, o.ranges, o.val_length, o.seed + 1, preprocessor
        )
    return train_set, val_set
