"""Differentiable projection of an image onto a detector: digitally reconstructed radiographs.

A DRR is the line integral of an attenuation map along the rays from an X-ray source to the
pixels of a detector (Siddon-style ray casting, here by sampling): for every pixel the rays are
sampled at ``samples`` points with trilinear (bilinear in 2D) interpolation and the values are
summed times the step length, so the DRR is differentiable with respect to the pose that places
the volume in the imaging system (and to the volume). A :class:`ProjectionGeometry` fixes the
system in world space: the central ray runs along world axis ``beam_axis`` through the
*isocentre* (a world point given at render time, e.g. the centre of the volume's grid), the
detector is perpendicular to it, its axes are the other world axes in order. With
``source_distance=None`` the beam is parallel (every ray along the beam axis); otherwise it is
a cone (a fan in 2D) from the source, ``source_distance`` mm before the isocentre, to the
detector, ``detector_distance`` mm from the source.

A pose is the homogeneous matrix ``T`` (``(N, D+1, D+1)``, system world → volume world): the
ray point ``x`` samples the volume at ``T x``, i.e. the DRR shows the volume moved by ``T⁻¹``.
Works for 3D volumes (2D detectors) and 2D images (1D detectors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from learnreg.core.grid import Grid, apply_matrix
from learnreg.spatial.sampling import sample

__all__ = ["ProjectionGeometry", "covering_depth", "drr", "project_points"]


@dataclass(frozen=True)
class ProjectionGeometry:
    """An X-ray imaging system: detector, source and the part of each ray that is integrated.

    Args:
        detector: pixels along the detector axes (``D − 1`` sizes: two for a 3D volume).
        pixel_spacing: mm per pixel on the detector (one value or one per axis).
        source_distance: source to isocentre (mm); None: a parallel beam.
        detector_distance: source to detector (mm; cone beam); must exceed
            ``source_distance``. A parallel beam's detector passes through the isocentre.
        beam_axis: the world axis of the central ray (from the source towards the detector).
        samples: sampling points per ray.
        depth: length (mm) of the integrated segment along the beam axis, centred on the
            isocentre: it must cover the volume (e.g. its largest diagonal).
    """

    detector: tuple[int, ...]
    pixel_spacing: tuple[float, ...] | float = 1.0
    source_distance: float | None = 1000.0
    detector_distance: float = 1500.0
    beam_axis: int = 1
    samples: int = 64
    depth: float = 256.0

    def __post_init__(self) -> None:
        det = tuple(int(s) for s in self.detector)
        if len(det) not in (1, 2) or min(det) < 1:
            raise ValueError(f"detector must be 1 or 2 positive sizes, got {self.detector!r}")
        object.__setattr__(self, "detector", det)
        sp = self.pixel_spacing
        sp = (float(sp),) * len(det) if isinstance(sp, int | float) else tuple(map(float, sp))
        if len(sp) != len(det) or not all(math.isfinite(s) and s > 0 for s in sp):
            raise ValueError(
                f"pixel_spacing must be one positive value or {len(det)}; got {self.pixel_spacing}"
            )
        object.__setattr__(self, "pixel_spacing", sp)
        if not 0 <= int(self.beam_axis) <= len(det):
            raise ValueError(f"beam_axis must be in 0..{len(det)}, got {self.beam_axis}")
        object.__setattr__(self, "beam_axis", int(self.beam_axis))
        if int(self.samples) < 1:
            raise ValueError(f"samples must be positive, got {self.samples}")
        if not (math.isfinite(self.depth) and self.depth > 0):
            raise ValueError(f"depth must be positive, got {self.depth}")
        if self.source_distance is not None:
            s, d = float(self.source_distance), float(self.detector_distance)
            if not (math.isfinite(s) and s > 0 and math.isfinite(d) and d > s):
                raise ValueError(
                    "a cone beam needs 0 < source_distance < detector_distance; got "
                    f"{self.source_distance} and {self.detector_distance}"
                )
            if self.depth / 2 >= s:
                raise ValueError(
                    f"depth/2 ({self.depth / 2}) must be less than source_distance ({s}): the "
                    "integrated segment would reach behind the source"
                )

    @property
    def ndim(self) -> int:
        """Dimensionality of the imaged volume (detector axes + 1)."""
        return len(self.detector) + 1

    @property
    def detector_axes(self) -> tuple[int, ...]:
        """World axes of the detector axes, in order (every axis but the beam's)."""
        return tuple(a for a in range(self.ndim) if a != self.beam_axis)

    @property
    def magnification(self) -> float:
        """Detector mm per isocentre mm (1 for a parallel beam)."""
        if self.source_distance is None:
            return 1.0
        return float(self.detector_distance) / float(self.source_distance)

    def pixel_offsets(self, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
        """Pixel centres ``(*detector, D−1)`` in mm on the detector, about its centre."""
        axes = [
            (torch.arange(n, dtype=dtype, device=device) - (n - 1) / 2) * s
            for n, s in zip(self.detector, self.pixel_spacing, strict=True)
        ]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)

    def rays(
        self, isocenter: Sequence[float], dtype: torch.dtype, device: torch.device | str | None
    ) -> tuple[Tensor, Tensor]:
        """Sampling points ``(*detector, samples, D)`` (world mm) of every pixel's ray and the
        ray length per sample ``(*detector)`` (mm): midpoints of ``samples`` equal steps of
        the beam-axis coordinate over ``depth`` about the isocentre."""
        d, b = self.ndim, self.beam_axis
        iso = torch.as_tensor(tuple(isocenter), dtype=dtype, device=device)
        if iso.shape != (d,):
            raise ValueError(f"isocenter must have {d} coordinates, got {tuple(isocenter)}")
        dz = self.depth / self.samples
        z = (torch.arange(self.samples, dtype=dtype, device=device) + 0.5) * dz - self.depth / 2
        offsets = self.pixel_offsets(dtype, device)  # (*det, D-1) on the detector
        det_shape = offsets.shape[:-1]
        pts = torch.zeros(*det_shape, self.samples, d, dtype=dtype, device=device)
        if self.source_distance is None:  # parallel: the ray of a pixel is a beam-axis line
            for k, a in enumerate(self.detector_axes):
                pts[..., a] = offsets[..., k, None]
            pts[..., b] = z
            length = torch.full(det_shape, dz, dtype=dtype, device=device)
        else:  # cone: the point of beam coordinate z on the ray source → pixel
            sid, sdd = float(self.source_distance), float(self.detector_distance)
            frac = (sid + z) / sdd  # fraction of the way to the detector plane
            for k, a in enumerate(self.detector_axes):
                pts[..., a] = offsets[..., k, None] * frac
            pts[..., b] = z
            # |dx/dz| along the ray: sqrt(1 + |offset|² / sdd²)
            length = dz * torch.sqrt(1 + offsets.square().sum(-1) / sdd**2)
        return pts + iso, length

    def project(self, points: Tensor, isocenter: Sequence[float]) -> Tensor:
        """Detector pixel coordinates ``(..., D−1)`` (fractional indices) of world points
        ``(..., D)`` in the system frame (differentiable)."""
        if points.shape[-1] != self.ndim:
            raise ValueError(
                f"project: points must be (..., {self.ndim}), got {tuple(points.shape)}"
            )
        iso = torch.as_tensor(tuple(isocenter), dtype=points.dtype, device=points.device)
        rel = points - iso
        lateral = rel[..., list(self.detector_axes)]
        if self.source_distance is not None:
            dist = float(self.source_distance) + rel[..., self.beam_axis]
            if bool((dist <= 0).any()):
                raise ValueError("project: a point lies behind the X-ray source")
            lateral = lateral * (float(self.detector_distance) / dist)[..., None]
        sp = torch.tensor(self.pixel_spacing, dtype=points.dtype, device=points.device)
        centre = torch.tensor(
            [(n - 1) / 2 for n in self.detector], dtype=points.dtype, device=points.device
        )
        return lateral / sp + centre


def covering_depth(grid: Grid) -> float:
    """Integrated ray length (mm) that covers ``grid`` in any pose: its diagonal + 1 mm."""
    return float(math.hypot(*grid.extent)) + 1.0


def _check_pose(pose: Tensor | None, n: int, d: int, like: Tensor) -> Tensor:
    if pose is None:
        return torch.eye(d + 1, dtype=like.dtype, device=like.device).expand(n, d + 1, d + 1)
    if pose.dim() == 2:
        pose = pose.expand(n, *pose.shape)
    if pose.shape[1:] != (d + 1, d + 1) or pose.shape[0] not in (1, n):
        raise ValueError(
            f"pose must be homogeneous matrices ({n}, {d + 1}, {d + 1}), got {tuple(pose.shape)}"
        )
    return pose.to(like.dtype).expand(n, d + 1, d + 1)


def drr(
    volume: Tensor,
    grid: Grid,
    geometry: ProjectionGeometry,
    pose: Tensor | None = None,
    isocenter: Sequence[float] | None = None,
) -> Tensor:
    """The DRR ``(N, C, *detector)`` of ``volume (N, C, *S)`` on ``grid`` at ``pose``.

    ``pose`` (``(N, D+1, D+1)`` or ``(D+1, D+1)``; default identity) maps the system frame's
    world points to the volume's; ``isocenter`` defaults to the grid's centre. Values outside
    the volume count as zero. Differentiable with respect to ``pose`` and ``volume``.
    """
    d = geometry.ndim
    if volume.dim() != d + 2 or tuple(volume.shape[2:]) != tuple(grid.shape):
        raise ValueError(
            f"drr: a {len(geometry.detector)}D detector projects {d}D volumes (N, C, *S) on "
            f"the grid {tuple(grid.shape)}; got {tuple(volume.shape)}"
        )
    if not volume.is_floating_point():
        raise ValueError(f"drr: the volume must be floating point, got {volume.dtype}")
    iso = grid.center if isocenter is None else isocenter
    n = volume.shape[0]
    pose = _check_pose(pose, n, d, volume)
    pts, length = geometry.rays(iso, volume.dtype, volume.device)
    # one matrix per pose: system world → volume world → grid_sample's (x, y, z) coordinates
    flip = torch.eye(d + 1, dtype=torch.float64)
    flip[:d, :d] = flip[:d, :d].flip(0)
    to_sample = (flip @ torch.from_numpy(grid.world_to_normalized)).to(pose)
    coords = apply_matrix(to_sample @ pose, pts.expand(n, *pts.shape))  # (N, *det, S, D)
    values = sample(volume, coords)  # (N, C, *det, S)
    return values.sum(-1) * length


def project_points(
    points: Tensor,
    geometry: ProjectionGeometry,
    pose: Tensor | None = None,
    isocenter: Sequence[float] | None = None,
) -> Tensor:
    """Detector pixel coordinates ``(N, K, D−1)`` of volume world points ``(N, K, D)`` (or
    ``(K, D)``) at ``pose``: the projections of ``T⁻¹ q`` (``isocenter`` default: origin)."""
    if points.dim() == 2:
        points = points[None]
    d = geometry.ndim
    if points.dim() != 3 or points.shape[-1] != d:
        raise ValueError(f"project_points: points must be (N, K, {d}), got {tuple(points.shape)}")
    n = points.shape[0] if pose is None or pose.dim() == 2 else max(points.shape[0], len(pose))
    pose = _check_pose(pose, n, d, points)
    system = apply_matrix(torch.linalg.inv(pose), points.expand(n, *points.shape[1:]))
    return geometry.project(system, (0.0,) * d if isocenter is None else isocenter)
