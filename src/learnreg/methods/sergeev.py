"""Registration by learned interest-point detectors and RANSAC (Sergeev et al. 2012).

Sergeev, Zhao, Linguraru, Okada, Chu, Summers and Yoshida, "Medical image registration using
machine learning-based interest point detector", SPIE Medical Imaging 2012 (the earliest
neural-network method of the review's Table 1). One small feed-forward network per interest
point (landmark) is trained to tell the voxel at that landmark from other voxels of its
neighbourhood by the image around the voxel; at registration each landmark is detected in
both images (the voxel of maximal response within a search region) and the matched
detections give an affine transform by RANSAC.

Faithful: one detector per landmark, each an MLP with two hidden layers of 60 units and one
output scored as a binary classifier (logistic output, cross-entropy, "at the landmark" vs
"not"); detection as the maximal response within a search region; an affine from the
detections by RANSAC (3D); supervision by landmark positions only — no image similarity in
the loss.

Chosen here (the paper's text was not available offline while this was written; its own
feature vector, landmark set and CT data are not reproduced):
the landmarks are LPBA40 brain structure centroids defined on the atlas S01 and carried to
each training subject by learnreg's classical registration
(:mod:`learnreg.data.interest_points`, ``data.synthetic: {kind: interest-points}``); the
feature vector of a voxel is its multi-scale intensity patch (:func:`~learnreg.spatial.
point_patches.patch_features`: 5³ samples at strides 1, 2 and 4 voxels of the image
smoothed accordingly — 20, 40 and 80 mm cubes on the 4 mm grid); hidden units are tanh.
Positives are the voxels within ``positive_radius`` (voxels) of the landmark, negatives the
voxels of its search region at least ``negative_radius`` away (the 3^D neighbourhood of the
landmark plus ``negatives`` random voxels of the region per landmark and image, a fresh draw
every step); the two classes are weighted equally. The search region is a cube of
``search_radius`` voxels around the landmark's mean training position on the network grid
(a running mean over the training targets, kept in the checkpoint), the same region in both
images; the detection is refined to a sub-voxel position (response-weighted mean of the
maximum and its face neighbours). RANSAC: ``ransac_iterations`` minimal sets, MSAC cost,
inliers within ``inlier_threshold`` mm in world space, least-squares refit
(:func:`~learnreg.spatial.landmark_affine.ransac_affine`), seeded so that a prediction is
reproducible.

Scaled down for CPU: 4 mm network grid (40×48×40 for LPBA40). Training-mode forward skips
detection and RANSAC (returns the identity; the detectors are trained by :meth:`loss` on
sampled voxels); eval / predict / validation detect every landmark over its whole search
region and fit the affine. ``coord_conv`` (off by default, not in the paper) appends the
candidate's normalized coordinates to the detector input.

Measured (``benchmarks/sergeev_lpba40.py``, 600 steps, S01 ← S35–S40 at 1 mm, 56
structures): Dice after the affine 0.634 [0.621, 0.647] against the classical ``affine``
preset's 0.631 [0.615, 0.646] and the identity's 0.547; subject labels never used in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from learnreg.core.grid import Grid
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.point_detectors import DetectorBank
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.landmark_affine import ransac_affine
from learnreg.spatial.point_patches import patch_features, patch_offsets

__all__ = ["Sergeev2012"]

SOURCE = "data.synthetic: {kind: interest-points}"


@register_method(
    "sergeev2012",
    year=2012,
    ndim="3D (2D by the same code)",
    transform="affine (RANSAC on detected landmarks)",
    loss="cross-entropy of per-landmark detectors (landmark vs not)",
    supervision="supervised (landmark positions; atlas points mapped by classical registration)",
    reference="Sergeev et al., SPIE Medical Imaging 2012",
    aliases=("sergeev", "sergeev-interest-points"),
)
class Sergeev2012(RegistrationMethod):
    """Sergeev et al.'s per-landmark MLP detectors + RANSAC affine (module docstring).

    Args:
        ndim: 3 (the paper) or 2.
        landmarks: K, the number of landmarks (the data's, e.g. 56 LPBA40 structures).
        patch: patch width (odd), in samples, at each scale.
        scales: sampling strides (voxels) of the multi-scale patch.
        hidden: hidden widths of each detector (the paper: 60, 60).
        activation: hidden nonlinearity (``tanh``, ``sigmoid``, ``relu``).
        search_radius: half width (voxels) of the search cube around each landmark's mean
            position.
        positive_radius, negative_radius: voxels within the first of the landmark are
            positives, beyond the second negatives (between: not scored).
        negatives: random negatives drawn per landmark and image each training step.
        ransac_iterations, inlier_threshold: RANSAC's hypotheses and inlier distance (mm).
        seed: RANSAC's seed.
        coord_conv: append the candidate voxel's normalized grid coordinates (in [-1, 1],
            CoordConv's convention) to every detector's input — CoordConv's idea for these
            fully connected detectors (not in the paper; default off).

    ``batch.target``: ``(N, 2, K, D)`` landmark positions, index coordinates of the network
    grid, in the fixed (0) and moving (1) image.
    """

    def __init__(
        self,
        ndim: int = 3,
        landmarks: int = 56,
        patch: int = 5,
        scales: Sequence[int] = (1, 2, 4),
        hidden: Sequence[int] = (60, 60),
        activation: str = "tanh",
        search_radius: int = 4,
        positive_radius: float = 1.0,
        negative_radius: float = 2.0,
        negatives: int = 48,
        ransac_iterations: int = 500,
        inlier_threshold: float = 10.0,
        seed: int = 0,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"sergeev2012: ndim must be 2 or 3, got {ndim}")
        if landmarks < ndim + 1:
            raise ValueError(
                f"sergeev2012: a {ndim}D affine needs at least {ndim + 1} landmarks, got {landmarks}"
            )
        if search_radius < 1 or negatives < 1 or ransac_iterations < 1:
            raise ValueError(
                "sergeev2012: search_radius, negatives and ransac_iterations must be >= 1"
            )
        if positive_radius < math.sqrt(ndim) / 2:
            raise ValueError(
                f"sergeev2012: positive_radius must be >= {math.sqrt(ndim) / 2:.3g} (half a "
                f"voxel diagonal) so the voxel nearest a landmark is a positive"
            )
        if not negative_radius > positive_radius or not inlier_threshold > 0:
            raise ValueError(
                "sergeev2012: need negative_radius > positive_radius and inlier_threshold > 0"
            )
        self.ndim, self.landmarks = int(ndim), int(landmarks)
        self.patch, self.scales = int(patch), tuple(int(s) for s in scales)
        self.search_radius, self.negatives = int(search_radius), int(negatives)
        self.positive_radius, self.negative_radius = float(positive_radius), float(negative_radius)
        self.ransac_iterations, self.inlier_threshold = (
            int(ransac_iterations),
            float(inlier_threshold),
        )
        self.seed = int(seed)
        self.coord_conv = bool(coord_conv)
        features = len(self.scales) * patch_offsets(self.ndim, self.patch).shape[0]
        features += self.ndim if self.coord_conv else 0
        self.detectors = DetectorBank(self.landmarks, features, hidden, activation)
        self.register_buffer("centres", torch.zeros(self.landmarks, self.ndim))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    # ---------------------------------------------------------------- data
    def landmark_target(self, batch: RegistrationBatch) -> Tensor:
        """``batch.target`` as ``(N, 2, K, D)`` float; a ValueError naming the data source
        when it is missing or of another shape."""
        t, f = batch.target, batch.fixed
        want = (f.shape[0], 2, self.landmarks, self.ndim)
        if t is None or tuple(t.shape) != want:
            got = "none" if t is None else tuple(t.shape)
            raise ValueError(
                f"{self.name}: supervised by landmark positions; the batch needs target {want} "
                f"(fixed and moving landmarks in grid voxels, e.g. {SOURCE}), got {got}"
            )
        return t.to(f.dtype)

    @torch.no_grad()
    def _update_centres(self, target: Tensor) -> None:
        points = target.reshape(-1, self.landmarks, self.ndim).to(self.centres)
        n = float(self.seen)
        m = points.shape[0]
        self.centres.mul_(n / (n + m)).add_(points.sum(0) / (n + m))
        self.seen.add_(m)

    def _clamp(self, points: Tensor, shape: Sequence[int]) -> Tensor:
        upper = torch.tensor([s - 1 for s in shape], device=points.device)
        return torch.minimum(points.clamp(min=0), upper)

    def search_points(self, shape: Sequence[int]) -> Tensor:
        """The ``(K, C, D)`` integer voxels of each landmark's search cube on a grid of
        ``shape`` (clamped to it); a ValueError before training has placed the cubes."""
        if float(self.seen) == 0:
            raise ValueError(
                f"{self.name}: the detectors have no search regions yet (train the model: the "
                f"mean landmark positions are learnt from the training targets)"
            )
        cube = patch_offsets(self.ndim, 2 * self.search_radius + 1).to(self.centres.device)
        return self._clamp(self.centres.round().long()[:, None] + cube, shape)

    # ---------------------------------------------------------------- detection
    def responses(self, image: Tensor, points: Tensor, chunk: int = 256) -> Tensor:
        """Detector logits ``(K, C)`` of ``image`` ``(1, *S)`` at integer voxels ``points``
        ``(K, C, D)`` (detector k at ``points[k]``)."""
        shape = torch.tensor(image.shape[1:], device=points.device)
        out = []
        for j in range(0, points.shape[1], chunk):
            p = points[:, j : j + chunk]
            f = patch_features(image, p, self.patch, self.scales)
            if self.coord_conv:
                coords = 2 * p.to(f.dtype) / (shape - 1).clamp(min=1).to(f.dtype) - 1
                f = torch.cat([f, coords], dim=-1)
            out.append(self.detectors(f))
        return torch.cat(out, dim=1)

    def detect(self, image: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """Each landmark's position ``(K, D)`` (voxels, sub-voxel) in ``image`` ``(1, *S)``
        among the candidates ``points`` ``(K, C, D)``, and its response (probability)."""
        logits = self.responses(image, points)
        best = logits.argmax(dim=1)
        at = torch.gather(points, 1, best[:, None, None].expand(-1, 1, self.ndim))  # (K, 1, D)
        near = (points - at).abs().sum(-1) <= 1  # the maximum and its face neighbours
        w = torch.sigmoid(logits) * near
        pos = (w[..., None] * points.to(w.dtype)).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)
        return pos, torch.sigmoid(logits.max(dim=1).values)

    # ---------------------------------------------------------------- interface
    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        d = self.ndim
        if fixed.dim() != d + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"{self.name}: expected fixed and moving (N, 1, *S) {d}D batches of one shape, "
                f"got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        grid = grid if grid is not None else unit_grid(fixed)
        n = fixed.shape[0]
        if self.training:  # detectors train on sampled voxels (loss); no detection here
            identity = AffineTransform.identity(d, n).to(fixed.device)
            return MethodOutput(identity, grid, moving)
        points = self.search_points(fixed.shape[2:])
        matrices, extras = [], {"fixed_points": [], "moving_points": [], "inliers": []}
        for i in range(n):
            pf, _ = self.detect(fixed[i], points)
            pm, _ = self.detect(moving[i], points)
            wf = grid.index_to_world(pf.double().cpu())
            wm = grid.index_to_world(pm.double().cpu())
            g = torch.Generator().manual_seed(self.seed)
            m, inliers = ransac_affine(wf, wm, self.inlier_threshold, self.ransac_iterations, g)
            matrices.append(m)
            extras["fixed_points"].append(pf)
            extras["moving_points"].append(pm)
            extras["inliers"].append(inliers)
        out = {k: torch.stack(v) for k, v in extras.items()}
        transform = AffineTransform(torch.stack(matrices).to(fixed.device, fixed.dtype))
        return MethodOutput(transform, grid, moving, extras=out)

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        target = self.landmark_target(batch)
        if self.training:
            self._update_centres(target)
        if float(self.seen) == 0:
            raise ValueError(f"{self.name}: loss of an untrained model outside training mode")
        shape = batch.fixed.shape[2:]
        device = batch.fixed.device
        near = patch_offsets(self.ndim, 3).to(device)
        centre = self.centres.round().long()
        r = self.search_radius
        logits, labels = [], []
        for i in range(batch.fixed.shape[0]):
            for image, pts in ((batch.fixed[i], target[i, 0]), (batch.moving[i], target[i, 1])):
                local = pts.round().long()[:, None] + near
                rand = torch.randint(-r, r + 1, (self.landmarks, self.negatives, self.ndim))
                cand = self._clamp(torch.cat([local, centre[:, None] + rand.to(device)], 1), shape)
                dist = torch.linalg.norm(cand.to(pts.dtype) - pts[:, None], dim=-1)
                labels.append(
                    torch.where(dist <= self.positive_radius, 1.0, 0.0)
                    - (dist > self.positive_radius).float() * (dist < self.negative_radius).float()
                )  # 1 positive, 0 negative, -1 not scored
                logits.append(self.responses(image, cand))
        z, y = torch.stack(logits), torch.stack(labels)
        pos, neg = y == 1, y == 0
        bce = F.binary_cross_entropy_with_logits(z, pos.to(z.dtype), reduction="none")
        positive = (bce * pos).sum() / pos.sum().clamp_min(1)
        negative = (bce * neg).sum() / neg.sum().clamp_min(1)
        with torch.no_grad():
            accuracy = 0.5 * (
                ((z > 0) & pos).sum() / pos.sum().clamp_min(1)
                + ((z <= 0) & neg).sum() / neg.sum().clamp_min(1)
            )
        return {
            "total": 0.5 * (positive + negative),
            "positive": positive,
            "negative": negative,
            "balanced_accuracy": accuracy,
        }
