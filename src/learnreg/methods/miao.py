"""2D/3D rigid registration by hierarchical CNN regression of the pose (PEHL).

Miao, Wang and Liao, "A CNN Regression Approach for Real-Time 2D/3D Registration", IEEE TMI
35(5), 2016. An X-ray image (2D) is registered to a 3D attenuation volume by regressing the
six rigid pose parameters from the *residual* between the X-ray and the digitally
reconstructed radiograph (DRR) of the volume at the current pose estimate
(:mod:`learnreg.spatial.projection`), in the paper's scheme "PEHL" (Pose Estimation via
Hierarchical Learning):

- **parameters** ``t = (t_u, t_v, t_beam, θ, α, β)``: translations along the detector axes
  (in-plane) and along the beam (out-of-plane, mm), rotation about the beam (in-plane, θ) and
  about the two detector axes (out-of-plane, α, β; degrees); see :func:`pose_matrix`;
- **local image residual (LIR)**: patches of the residual ``X − DRR(t)`` centred on the
  projections of 3D points of the volume at the current pose (pose-indexed features, so
  that what a regressor sees does not move with the parameters it does not regress);
- **hierarchical regression**: three groups regressed in turn, each on a fresh LIR after
  the previous group's update — in-plane ``(t_u, t_v, θ)``, out-of-plane rotations
  ``(α, β)``, out-of-plane translation ``t_beam`` — and the hierarchy repeated
  ``iterations`` times, the pose updated additively ``t ← t + δt``;
- **zones**: the ``(α, β)`` plane is partitioned into ``zones`` of ``zone_width`` degrees;
  every zone has its own three regressors and a sample uses those of the zone of its current
  out-of-plane estimate (:meth:`MiaoPEHL.zone_of`);
- **CNN**: per patch, shared convolution + max-pooling layers and a fully connected layer;
  the patch features concatenated, fully connected layers regress the group's parameters;
- **loss (MSQ_T)**: mean squared error of the regressed parameter residuals, each parameter
  divided by its weight ``weights`` (its scale: mm or degrees of a typical residual) so that
  translations and rotations weigh alike; supervised by DRRs of known random poses.

Interface (2D/3D): ``fixed`` is the X-ray ``(N, 1, *detector)``, ``moving`` the volume
``(N, 1, D, H, W)`` and ``grid`` the volume's network grid (3D, world mm). The imaging
system's frame is the volume's world frame with the isocentre at the grid's centre
(:class:`~learnreg.spatial.projection.ProjectionGeometry`: the method's geometry). The
transform is the rigid pose ``T`` (system world → volume world, "fixed → moving"), an
:class:`~learnreg.spatial.AffineTransform`; ``warped`` is the volume resampled in the system
frame, and ``extras["drr"]`` the DRR at the final pose, which should match ``fixed``. The
start pose is the identity (the volume as placed in the system). The two images have
different dimensionality, so :class:`RegistrationBatch` carries them as they are; the batch's
``grid`` is the volume's. Command line: ``learnreg train`` with ``data.synthetic: {kind: drr}``
(:mod:`learnreg.data.drr_pairs`) and ``learnreg register XRAY_2D VOLUME_3D --model CKPT``
(:mod:`learnreg.zoo.projection`, :mod:`learnreg.api.projection`).

Faithful: the parameterization and grouping, LIR on projected 3D points, zone-wise
regressors, the hierarchical and iterative application, per-patch CNN with concatenated
features, the weighted parameter MSE, supervision by DRRs of random poses. Scaled down for
CPUs (configurable): 32×32 detector, 8 patches of 16×16 pixels (paper 52×52), conv 8 and 16
channels of 3×3 (paper 20 and 50 of 5×5), fully connected 32 per patch and 128 (paper 1024).
Differs: the 3D points are a lattice over the volume's grid (the paper takes points on the
imaged structure's edges); the zone is chosen from the current estimate at every step (the
paper from the starting pose), and each zone's regressors are trained on the poses the
hierarchy reaches there (the paper trains every zone on its own pose samples; with
``train_iterations=1``, as in the test and benchmark, only the passes from the identity are
trained, so only the central zone learns in-plane steps); the volumes
are MRI used as attenuation maps (no CT volume ships with a registry package; the paper notes
MRI can be converted to one).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid, apply_matrix
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.regression import RegressionHead, VGGEncoder
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.linear import rotation_matrix
from learnreg.spatial.projection import ProjectionGeometry, covering_depth, drr, project_points
from learnreg.spatial.sampling import sample

__all__ = [
    "POSE_NAMES",
    "GROUPS",
    "pose_matrix",
    "pose_errors",
    "random_poses",
    "LIRRegressor",
    "MiaoPEHL",
]

POSE_NAMES = ("t_u", "t_v", "t_beam", "theta", "alpha", "beta")
"""The six pose parameters: mm along the detector axes and the beam, degrees about the beam
and about the detector axes."""

GROUPS = ((0, 1, 3), (4, 5), (2,))
"""PEHL's parameter groups, in the order they are regressed: in-plane ``(t_u, t_v, θ)``,
out-of-plane rotations ``(α, β)``, out-of-plane translation ``t_beam``."""


def pose_matrix(params: Tensor, geometry: ProjectionGeometry, center: Sequence[float]) -> Tensor:
    """Homogeneous poses ``(N, 4, 4)`` (system world → volume world) of ``params (N, 6)``.

    ``T x = c + R (x − c) + t``: ``c`` the isocentre, ``R = R_beam(θ) R_u(α) R_v(β)``
    (rotations about the beam and the detector axes ``u``, ``v``), ``t`` the translation
    ``t_u e_u + t_v e_v + t_beam e_beam`` (differentiable)."""
    if geometry.ndim != 3:
        raise ValueError("pose_matrix: the six-parameter pose is for 3D volumes (2D detectors)")
    if params.dim() != 2 or params.shape[1] != 6:
        raise ValueError(f"pose parameters must be (N, 6), got {tuple(params.shape)}")
    n, dt, dev = params.shape[0], params.dtype, params.device
    u, v = geometry.detector_axes
    b = geometry.beam_axis

    def about(axis: int, degrees: Tensor) -> Tensor:
        omega = torch.zeros(n, 3, dtype=dt, device=dev)
        omega = omega.index_copy(
            1, torch.tensor([axis], device=dev), torch.deg2rad(degrees)[:, None]
        )
        return rotation_matrix(omega)

    rot = about(b, params[:, 3]) @ about(u, params[:, 4]) @ about(v, params[:, 5])
    t = torch.zeros(n, 3, dtype=dt, device=dev)
    t = t.index_copy(1, torch.tensor([u, v, b], device=dev), params[:, :3])
    c = torch.as_tensor(tuple(center), dtype=dt, device=dev)
    m = torch.eye(4, dtype=dt, device=dev).repeat(n, 1, 1)
    m[:, :3, :3] = rot
    m[:, :3, 3] = c - (rot @ c) + t
    return m


def pose_errors(pred: Tensor, true: Tensor, points: Tensor) -> dict[str, Tensor]:
    """Per pair, between pose matrices ``(N, 4, 4)``: ``mtre`` — mean distance (mm) of the
    points ``(K, 3)`` (volume world) mapped by the two poses' inverses, i.e. where the
    prediction and the truth place them in the system; ``rotation`` — angle of
    ``R_predᵀ R_true`` (degrees); ``translation`` — distance of the isocentre's images (mm)."""
    if pred.shape != true.shape or pred.shape[1:] != (4, 4):
        raise ValueError(
            f"pose_errors: expected two (N, 4, 4) poses, got {tuple(pred.shape)} and "
            f"{tuple(true.shape)}"
        )
    pred, true = pred.double(), true.double()
    ip, it = torch.linalg.inv(pred), torch.linalg.inv(true)
    pts = points.double().expand(pred.shape[0], *points.shape)
    mtre = (apply_matrix(ip, pts) - apply_matrix(it, pts)).norm(dim=-1).mean(-1)
    rel = pred[:, :3, :3].transpose(1, 2) @ true[:, :3, :3]
    cos = ((rel.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)
    centre = points.double().mean(0)[None, None].expand(pred.shape[0], 1, 3)
    trans = (apply_matrix(ip, centre) - apply_matrix(it, centre)).norm(dim=-1)[:, 0]
    return {"mtre": mtre, "rotation": torch.rad2deg(torch.arccos(cos)), "translation": trans}


def random_poses(n: int, ranges: Sequence[float], generator: torch.Generator) -> Tensor:
    """``(n, 6)`` poses uniform in ``±ranges`` (mm, degrees) per parameter."""
    r = torch.as_tensor(tuple(ranges), dtype=torch.float32)
    if r.shape != (6,) or bool((r < 0).any()):
        raise ValueError(f"ranges must be 6 non-negative values, got {tuple(ranges)}")
    return (torch.rand(n, 6, generator=generator) * 2 - 1) * r


class LIRRegressor(nn.Module):
    """One PEHL regressor: ``K`` LIR patches ``(N, K, P, P)`` → ``(N, out)`` parameters.

    Each patch goes through the same conv/max-pool tower and a fully connected layer; the
    ``K`` patch features are concatenated and fully connected layers regress the group."""

    def __init__(
        self,
        patches: int,
        patch: int,
        out: int,
        features: Sequence[int] = (8, 16),
        patch_hidden: int = 32,
        hidden: Sequence[int] = (128,),
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        feats = tuple(int(f) for f in features)
        self.encoder = VGGEncoder(
            2,
            1,
            feats,
            tuple(range(len(feats))),
            pooling="max",
            norm=None,
            coord_conv=coord_conv,
            negative_slope=0.0,
        )
        size = math.prod(self.encoder.output_shape((patch, patch))) * feats[-1]
        self.patch_fc = nn.Sequential(nn.Flatten(), nn.Linear(size, patch_hidden), nn.ReLU())
        self.head = RegressionHead(patches * patch_hidden, out, hidden, dropout=0.0, init_std=0.0)
        self.patches = int(patches)

    def forward(self, lir: Tensor) -> Tensor:
        n, k = lir.shape[:2]
        per_patch = self.patch_fc(self.encoder(lir.reshape(n * k, 1, *lir.shape[2:])))
        return self.head(per_patch.reshape(n, -1))


@register_method(
    "miao-pehl",
    year=2016,
    ndim="2D/3D",
    transform="rigid",
    loss="parameter MSE (MSQ_T, weighted)",
    supervision="supervised",
    reference="Miao, Wang and Liao, IEEE TMI 2016",
    aliases=("miao", "pehl"),
)
class MiaoPEHL(RegistrationMethod):
    """2D/3D rigid pose regression from local image residuals, hierarchical and zone-wise.

    Args:
        detector: X-ray size in pixels (rows along world axis ``u``, columns along ``v``).
        pixel_spacing: detector pixel size (mm).
        source_distance: source to isocentre (mm); None: parallel beam.
        detector_distance: source to detector (mm).
        beam_axis: the world axis of the central ray.
        samples: DRR samples per ray.
        depth: integrated length per ray (mm); None: the volume grid's diagonal.
        landmarks: points per axis of the 3D lattice whose projections centre the patches.
        landmark_extent: fraction of the grid's extent the lattice spans.
        patch: LIR patch size (pixels).
        zones: ``(n_α, n_β)`` zones of the out-of-plane rotations.
        zone_width: degrees of a zone along α and β (zones are centred on 0).
        iterations: passes of the three-group hierarchy.
        train_iterations: passes in training (None: ``iterations``); fewer passes train
            faster (each regressor then sees the residuals of the first passes only).
        weights: scale of each pose parameter in the loss (mm, degrees; MSQ_T).
        features / patch_hidden / hidden: the regressors' CNN (see :class:`LIRRegressor`).
        coord_conv: CoordConv first layer of the patch tower (Liu et al. 2018; patch
            coordinates, not detector ones).
    """

    def __init__(
        self,
        detector: Sequence[int] = (32, 32),
        pixel_spacing: float = 8.0,
        source_distance: float | None = 700.0,
        detector_distance: float = 1000.0,
        beam_axis: int = 1,
        samples: int = 48,
        depth: float | None = None,
        landmarks: int = 2,
        landmark_extent: float = 0.5,
        patch: int = 16,
        zones: Sequence[int] = (1, 1),
        zone_width: float = 20.0,
        iterations: int = 3,
        train_iterations: int | None = None,
        weights: Sequence[float] = (4.0, 4.0, 10.0, 4.0, 4.0, 4.0),
        features: Sequence[int] = (8, 16),
        patch_hidden: int = 32,
        hidden: Sequence[int] = (128,),
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        self.geometry = ProjectionGeometry(
            tuple(detector),
            pixel_spacing,
            source_distance,
            detector_distance,
            beam_axis,
            samples,
            1.0 if depth is None else float(depth),
        )
        if self.geometry.ndim != 3:
            raise ValueError(
                f"miao-pehl registers 2D X-rays: detector needs 2 sizes, got {detector}"
            )
        self.depth = None if depth is None else float(depth)
        zones = tuple(int(z) for z in zones)
        if len(zones) != 2 or min(zones) < 1:
            raise ValueError(f"zones must be two positive counts (alpha, beta), got {zones}")
        if not (math.isfinite(zone_width) and zone_width > 0):
            raise ValueError(f"zone_width must be positive, got {zone_width}")
        if int(landmarks) < 1 or not 0 <= landmark_extent <= 1:
            raise ValueError(
                f"landmarks must be >= 1 and landmark_extent in [0, 1]; got {landmarks}, "
                f"{landmark_extent}"
            )
        if int(patch) < 4 or int(iterations) < 1:
            raise ValueError(f"patch must be >= 4 and iterations >= 1; got {patch}, {iterations}")
        w = torch.as_tensor(tuple(weights), dtype=torch.float32)
        if w.shape != (6,) or not bool((w > 0).all()):
            raise ValueError(f"weights must be 6 positive values, got {tuple(weights)}")
        self.register_buffer("weights", w, persistent=False)
        self.zones, self.zone_width = zones, float(zone_width)
        self.landmarks, self.landmark_extent = int(landmarks), float(landmark_extent)
        self.patch, self.iterations = int(patch), int(iterations)
        self.train_iterations = (
            self.iterations if train_iterations is None else int(train_iterations)
        )
        if self.train_iterations < 1:
            raise ValueError(f"train_iterations must be >= 1, got {train_iterations}")
        k = self.landmarks**3
        self.regressors = nn.ModuleList(
            nn.ModuleList(
                LIRRegressor(k, self.patch, len(g), features, patch_hidden, hidden, coord_conv)
                for g in GROUPS
            )
            for _ in range(zones[0] * zones[1])
        )

    projection = True

    # -- geometry
    def geometry_for(self, grid: Grid) -> ProjectionGeometry:
        """The method's geometry with the integrated depth resolved for ``grid``."""
        if self.depth is not None:
            return self.geometry
        return dataclasses.replace(self.geometry, depth=covering_depth(grid))

    def projection_geometry(self, grid: Grid) -> ProjectionGeometry:
        return self.geometry_for(grid)

    def pose(self, params: Tensor, grid: Grid) -> Tensor:
        """Pose matrices ``(N, 4, 4)`` of ``params`` about the centre of ``grid``."""
        return pose_matrix(params, self.geometry, grid.center)

    def render(self, volume: Tensor, grid: Grid, params: Tensor) -> Tensor:
        """DRRs ``(N, 1, *detector)`` of ``volume`` at the poses ``params (N, 6)``."""
        return drr(volume, grid, self.geometry_for(grid), self.pose(params.to(volume.dtype), grid))

    def landmark_points(self, grid: Grid, dtype: torch.dtype, device) -> Tensor:
        """The 3D points ``(K, 3)`` (volume world) whose projections centre the patches."""
        n = self.landmarks
        frac = torch.linspace(-0.5, 0.5, n) if n > 1 else torch.zeros(1)
        frac = frac * self.landmark_extent
        axes = [(s - 1) * (0.5 + frac) for s in grid.shape]
        idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        return grid.index_to_world(idx.to(dtype=torch.float64)).to(dtype=dtype, device=device)

    def zone_of(self, params: Tensor) -> Tensor:
        """Zone index ``(N,)`` of the out-of-plane rotations ``(α, β)`` of ``params``
        (clamped to the outer zones)."""
        na, nb = self.zones
        out = []
        for col, nz in ((4, na), (5, nb)):
            z = torch.floor(params[:, col].detach() / self.zone_width + nz / 2)
            out.append(z.clamp(0, nz - 1).long())
        return out[0] * nb + out[1]

    # -- features
    def lir(self, xray: Tensor, volume: Tensor, grid: Grid, params: Tensor) -> Tensor:
        """Local image residual patches ``(N, K, P, P)`` of ``xray − DRR(params)``, each
        normalized by the X-ray's mean, centred on the projected landmark points."""
        geo = self.geometry_for(grid)
        with torch.no_grad():
            residual = xray - self.render(volume, grid, params)
            residual = residual / xray.mean(dim=(2, 3), keepdim=True).clamp(min=1e-6)
            pts = self.landmark_points(grid, volume.dtype, volume.device)
            centres = project_points(
                pts, geo, self.pose(params.to(volume.dtype), grid), grid.center
            )
        h = (
            torch.arange(self.patch, dtype=volume.dtype, device=volume.device)
            - (self.patch - 1) / 2
        )
        offs = torch.stack(torch.meshgrid(h, h, indexing="ij"), -1)  # (P, P, 2) pixels
        where = centres[:, :, None, None, :] + offs  # (N, K, P, P, 2) detector indices
        det = torch.tensor(geo.detector, dtype=volume.dtype, device=volume.device)
        norm = (2 * where / (det - 1) - 1).flip(-1)  # grid_sample's (x, y) order
        n, k = norm.shape[:2]
        patches = sample(residual, norm.reshape(n, k * self.patch, self.patch, 2))
        return patches.reshape(n, k, self.patch, self.patch)

    def check_pair(self, fixed: Tensor, moving: Tensor, grid: Grid) -> None:
        det = self.geometry.detector
        if fixed.dim() != 4 or fixed.shape[1] != 1 or tuple(fixed.shape[2:]) != det:
            raise InputError(
                f"miao-pehl: fixed must be the X-ray (N, 1, {det[0]}, {det[1]}) (the method's "
                f"detector); got {tuple(fixed.shape)}"
            )
        if moving.dim() != 5 or moving.shape[1] != 1 or moving.shape[0] != fixed.shape[0]:
            raise InputError(
                f"miao-pehl: moving must be the 3D volume (N, 1, D, H, W) with N = "
                f"{fixed.shape[0]}; got {tuple(moving.shape)}"
            )
        if tuple(grid.shape) != tuple(moving.shape[2:]):
            raise InputError(
                f"miao-pehl: the grid {tuple(grid.shape)} must be the volume's "
                f"{tuple(moving.shape[2:])}"
            )

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        grid = unit_grid(moving) if grid is None else grid
        self.check_pair(fixed, moving, grid)
        params = torch.zeros(fixed.shape[0], 6, dtype=fixed.dtype, device=fixed.device)
        steps = []
        for _ in range(self.train_iterations if self.training else self.iterations):
            for g, cols in enumerate(GROUPS):
                zone = self.zone_of(params)
                features = self.lir(fixed, moving, grid, params)
                delta = torch.zeros(
                    len(params), len(cols), dtype=params.dtype, device=params.device
                )
                for z in torch.unique(zone).tolist():
                    sel = zone == z
                    delta = delta.index_put((sel,), self.regressors[z][g](features[sel]))
                steps.append({"group": g, "before": params.detach(), "delta": delta})
                params = params.detach().clone()
                params[:, list(cols)] += delta.detach()
        pose = self.pose(params, grid)
        extras = {"params": params, "steps": steps}
        if self.training:  # the loss needs the steps only: no warp, no final DRR
            return MethodOutput(AffineTransform(pose), grid, None, extras)
        extras["drr"] = self.render(moving, grid, params)
        return MethodOutput(AffineTransform(pose), grid, moving, extras)

    # -- supervision
    def _target(self, batch: RegistrationBatch, like: Tensor) -> Tensor:
        t = batch.target
        if t is None or tuple(t.shape) != (like.shape[0], 6):
            got = "none" if t is None else tuple(t.shape)
            raise ValueError(
                "miao-pehl is supervised: the batch needs `target`, the true pose parameters "
                f"({like.shape[0]}, 6) {POSE_NAMES} (mm, degrees) of the X-ray; got {got}"
            )
        return t.to(like.dtype)

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        """``msq_t``: the weighted parameter MSE of every regression step (mean over the
        steps); monitoring ``mtre`` (mm) and ``rotation_error`` (degrees) of the final pose."""
        target = self._target(batch, output.extras["params"])
        w = self.weights.to(target)
        terms = []
        for s in output.extras["steps"]:
            cols = list(GROUPS[s["group"]])
            want = (target - s["before"])[:, cols] / w[cols]
            terms.append((s["delta"] / w[cols] - want).square().mean())
        total = torch.stack(terms).mean()
        with torch.no_grad():
            err = self._errors(batch, output, target)
        return {
            "total": total,
            "msq_t": total.detach(),
            "mtre": err["mtre"].mean().float(),
            "rotation_error": err["rotation"].mean().float(),
        }

    def _errors(
        self, batch: RegistrationBatch, output: MethodOutput, target: Tensor
    ) -> dict[str, Tensor]:
        grid = output.grid
        lattice = grid.index_lattice(5, torch.float64, "cpu")
        pts = grid.index_to_world(lattice)
        true = self.pose(target.detach().cpu().double(), grid)
        pred = output.transform.homogeneous().detach().cpu().double()
        return pose_errors(pred, true, pts)

    def transform_error(self, batch: RegistrationBatch, output: MethodOutput) -> Tensor:
        """Mean target registration error (mm) over a 5×5×5 lattice spanning the volume."""
        target = self._target(batch, output.extras["params"])
        return self._errors(batch, output, target)["mtre"].to(target.dtype)
