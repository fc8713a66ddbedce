"""A learned multimodal similarity inside B-spline registration (Simonovsky et al.).

Simonovsky, Gutiérrez-Becker, Mateus, Navab and Komodakis, "A deep metric for multimodal
registration", MICCAI 2016. A two-channel CNN (the two modalities' patches stacked as input
channels, Zagoruyko & Komodakis' "2-ch" design) is trained as a classifier of patch pairs:
aligned pairs of two modalities are positives, pairs taken after a random small displacement
of one image are negatives, with the hinge loss. The trained score is then the similarity of
an iterative free-form (cubic B-spline) registration: summed over patches of the fixed
image's foreground, its gradient is back-propagated through the network to the warped image
and from there to the control points. The paper compares it with mutual information in the
same registration.

What is faithful: the 2-channel architecture (convolutions and ReLUs, no padding, ending in a
linear score: one receptive field = one patch), the positive/negative sampling (aligned pairs;
the same pairs after a random translation of the moving-modality image), the hinge loss
``max(0, 1 − y·s)`` (positives and negatives weighted equally), the metric as the mean score
over patches centred in the fixed image's foreground, and its gradient through the network to
the B-spline coefficients. The comparison uses the same B-spline registration with mutual
information (``metric="mi"``: any registered similarity runs in the same loop).

Scaled down for CPU: the paper scores 17³ patches at about 1 mm with a wider network trained
for days on IXI; here the score network has ``len(features)`` 3×3(×3) conv layers of a few
tens of channels (receptive field ``2·len(features) + 1`` voxels: 9 voxels = 36 mm on the
4 mm grid, 18 mm on 2 mm slices) and is evaluated densely (a fully convolutional pass equals
scoring every patch at stride 1). The registration is a two-level B-spline (control spacings
8 then 4 voxels, coarse coefficients refined exactly by B-spline subdivision) optimized by Adam
on the network grid, with a bending-energy penalty; the paper's optimizer and schedule are
not reproduced.

Data: no aligned same-subject multimodal brain pair exists in ``../shared/data`` or in a
package registry; :mod:`learnreg.data.modalities` makes a T2-like twin of each LPBA40 T1
(``data.synthetic: {kind: modality-pairs}``). Training pairs are each subject's T1 with the
T2-like twin of the same subject (aligned by construction): from a modality-pairs batch, the
fixed image (atlas, T2-like) with the atlas's T1 and the subject's T2-like twin with the
subject's T1 (``batch.target``). Channel 0 of the network is the fixed modality (T2-like),
channel 1 the moving one (T1); a model scores pairs in that order only. Labels are never used
in training (validation Dice only).

Differences: negatives are translations only (the paper also perturbs by small rotations and
scalings); intensities are scaled per image by the 99th percentile, as the T2-like twin has a
bias field of its own. The training-mode forward skips the registration (it returns the
identity B-spline: training only needs the score network); eval / prediction runs it.

Measured (2D axial LPBA40 slices on the 2 mm grid, features 16-16-32-32, 200 Adam steps of 4
modality pairs, B-spline iterations 30 + 30; no labels in training): S01 (T2-like) ← S35–S40
T1 mean Dice 0.420 [95 % CI 0.391, 0.446] against the identity's 0.367 and the same B-spline
registration with MI's 0.436 [0.412, 0.460] (``benchmarks/simonovsky_lpba40.py``); the
untrained network's registration 0.307. On this small, synthetic-contrast task the learned
metric does not beat MI (the paper reports it ahead of MI on real T1/T2 data).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.losses.functional import bending_energy
from learnreg.losses.terms import LossSpec, LossTerms
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.blocks import CoordConv, conv_nd
from learnreg.spatial.bspline import BSplineTransform, control_lattice_shape, evaluate_bspline
from learnreg.spatial.sampling import warp

__all__ = [
    "TwoChannelScorer",
    "SimonovskyMetric",
    "refine_bspline",
    "unit_intensity",
    "hinge_loss",
    "random_window",
    "translate",
]

SOURCE = "data.synthetic: {kind: modality-pairs}"


def unit_intensity(x: Tensor, q: float = 0.99) -> Tensor:
    """Each image of ``x`` ``(N, C, *S)`` divided by its ``q`` quantile (1 if that is 0)."""
    flat = x.flatten(1).float()
    scale = torch.quantile(flat, q, dim=1).clamp_min(1e-6)
    return x / scale.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def translate(x: Tensor, shift: Tensor) -> Tensor:
    """``x`` ``(N, C, *S)`` sampled at ``p + shift[n]`` (voxels, ``(N, D)``; zeros outside)."""
    d = x.dim() - 2
    u = shift.to(x.dtype).view(x.shape[0], d, *([1] * d)).expand(x.shape[0], d, *x.shape[2:])
    return warp(x, u.contiguous())


def random_window(images: Sequence[Tensor], size: int) -> list[Tensor]:
    """The same random window of ``size`` voxels per axis (capped by the image) of every
    tensor of ``images`` (all ``(N, C, *S)`` of one shape)."""
    out = list(images)
    for a, n in enumerate(out[0].shape[2:]):
        k = min(int(size), int(n))
        start = int(torch.randint(int(n) - k + 1, (1,)))
        out = [x.narrow(a + 2, start, k) for x in out]
    return out


def hinge_loss(positive: Tensor, negative: Tensor, mask: Tensor) -> Tensor:
    """The paper's hinge loss, positives and negatives weighted equally: mean over ``mask`` of
    ``max(0, 1 − s)`` on ``positive`` scores plus that of ``max(0, 1 + s)`` on ``negative``."""
    w = mask.to(positive.dtype)
    n = w.sum().clamp_min(1.0)
    pos = ((1 - positive).clamp_min(0) * w).sum() / n
    neg = ((1 + negative).clamp_min(0) * w).sum() / n
    return 0.5 * (pos + neg)


def refine_bspline(params: Tensor, shape: Sequence[int], spacing: int) -> Tensor:
    """Coefficients at control spacing ``spacing / 2`` of the same cubic B-spline field as
    ``params`` ``(N, C, *control)`` at ``spacing`` on a grid of ``shape`` (exact dyadic
    subdivision: a new point on an old one gets ``(c₋ + 6 c + c₊) / 8``, one halfway
    ``(c + c₊) / 2``)."""
    if spacing % 2:
        raise ValueError(f"refine_bspline: spacing must be even, got {spacing}")
    half = spacing // 2
    want = control_lattice_shape(shape, [half] * len(shape))
    x = params
    for a in range(len(shape)):
        ax = a + 2
        c = x.movedim(ax, -1)
        mid = 0.5 * (c[..., :-1] + c[..., 1:])  # fine points 0, 2, 4, ...
        on = (c[..., :-2] + 6 * c[..., 1:-1] + c[..., 2:]) / 8  # fine points 1, 3, ...
        fine = torch.stack([mid[..., :-1], on], dim=-1).flatten(-2)
        fine = torch.cat([fine, mid[..., -1:]], dim=-1)[..., : want[a]]
        x = fine.movedim(-1, ax)
    return x


class TwoChannelScorer(nn.Module):
    """The paper's 2-channel network: fixed- and moving-modality patches stacked as input
    channels, conv 3 (no padding) + ReLU layers, then a linear score (a 1-kernel conv);
    ``coord_conv`` puts a 1-kernel CoordConv layer (normalized image coordinates as extra
    inputs; not in the paper) in front.

    Applied to images ``(N, 1, *S)`` it scores every patch of :attr:`patch` voxels at once:
    ``(N, 1, *(S − patch + 1))``, the score of the patch whose corner is at each voxel."""

    def __init__(
        self, ndim: int, features: Sequence[int] = (32, 32, 64, 64), coord_conv: bool = False
    ) -> None:
        super().__init__()
        conv = conv_nd(ndim)
        layers: list[nn.Module] = []
        prev = 2
        if coord_conv:  # a 1-kernel CoordConv layer in front: the patch size is unchanged
            layers.append(CoordConv(ndim, 2, int(features[0]), kernel_size=1, negative_slope=0.0))
            prev = int(features[0])
        for f in features:
            layers += [conv(prev, int(f), 3), nn.ReLU(inplace=True)]
            prev = int(f)
        layers.append(conv(prev, 1, 1))
        self.net = nn.Sequential(*layers)
        self.ndim = ndim
        self.patch = 2 * len(features) + 1

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        return self.net(torch.cat([fixed, moving], dim=1))


@register_method(
    "simonovsky",
    year=2016,
    ndim="3D (2D by the same layers)",
    transform="B-spline FFD (optimized per pair)",
    loss="hinge loss on aligned vs displaced patch pairs; registration by the learned score",
    supervision="supervised (aligned multimodal patch pairs)",
    reference="Simonovsky et al., MICCAI 2016",
    aliases=("simonovsky2016", "deep-metric"),
)
class SimonovskyMetric(RegistrationMethod):
    """Simonovsky et al.'s learned multimodal metric driving a B-spline registration.

    Args:
        ndim: 3 or 2.
        features: channels of the score network's conv layers (receptive field
            ``2 · len(features) + 1`` voxels).
        min_shift, max_shift: range of the random translation (voxels of the network grid)
            that makes a negative pair.
        foreground: intensity (after :func:`unit_intensity`) above which a patch centre counts
            as foreground, in training and in the registration's metric.
        metric: ``"learned"`` (the network's mean score) or any registered similarity spec
            (e.g. ``"mi"``, ``{mi: {bins: 32}}``) run in the same B-spline registration.
        control_spacings: B-spline control spacing (voxels, each a power-of-two fraction of
            the first) of each level, coarse to fine.
        iterations: Adam steps per level; ``learning_rate``: their step (coefficient voxels).
        bending_weight: weight of the dense field's bending energy.
        train_crop: train on one random window of this many voxels per axis of each batch
            (its patches) instead of whole images: cheaper steps; None: whole images.
        coord_conv: :class:`TwoChannelScorer`'s CoordConv option (off: the paper).
    """

    config_aliases: ClassVar[dict[str, str]] = {"lr": "learning_rate"}

    def __init__(
        self,
        ndim: int = 3,
        features: Sequence[int] = (32, 32, 64, 64),
        min_shift: float = 1.0,
        max_shift: float = 3.0,
        foreground: float = 0.05,
        metric: LossSpec = "learned",
        control_spacings: Sequence[int] = (8, 4),
        iterations: Sequence[int] = (40, 40),
        learning_rate: float = 0.2,
        bending_weight: float = 1.0,
        train_crop: int | None = None,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"simonovsky: ndim must be 2 or 3, got {ndim!r}")
        if not 0 < min_shift <= max_shift:
            raise ValueError(
                f"simonovsky: need 0 < min_shift <= max_shift, got {min_shift}, {max_shift}"
            )
        spacings = [int(s) for s in control_spacings]
        if not spacings or len(spacings) != len(iterations):
            raise ValueError("simonovsky: control_spacings and iterations need one entry per level")
        for a, b in zip(spacings, spacings[1:], strict=False):
            if b < 1 or a % b or (a // b) & (a // b - 1):
                raise ValueError(
                    f"simonovsky: each control spacing must be the previous one halved (a "
                    f"power of two times), got {spacings}"
                )
        self.ndim = ndim
        self.scorer = TwoChannelScorer(ndim, features, coord_conv)
        self.min_shift, self.max_shift = float(min_shift), float(max_shift)
        self.foreground = float(foreground)
        self.learned = metric == "learned"
        self.similarity = None if self.learned else LossTerms(metric, "similarity", role="metric")
        self.control_spacings = spacings
        self.iterations = [int(i) for i in iterations]
        self.learning_rate = float(learning_rate)
        self.bending_weight = float(bending_weight)
        if train_crop is not None and int(train_crop) < self.scorer.patch:
            raise ValueError(
                f"simonovsky: train_crop {train_crop} is smaller than one "
                f"{self.scorer.patch}-voxel patch"
            )
        self.train_crop = None if train_crop is None else int(train_crop)

    # -- inputs
    def _check(self, fixed: Tensor, moving: Tensor) -> None:
        d = self.ndim
        for name, x in (("fixed", fixed), ("moving", moving)):
            if x.dim() != d + 2 or x.shape[1] != 1:
                raise InputError(
                    f"{self.name}: {name} must be (N, 1, {', '.join('S' * d)}) for a {d}D "
                    f"model, got {tuple(x.shape)}"
                )
        if fixed.shape != moving.shape:
            raise InputError(
                f"{self.name}: fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} "
                "must have the same shape"
            )
        small = min(fixed.shape[2:])
        if small < max(self.scorer.patch, 4):
            raise InputError(
                f"{self.name}: images {tuple(fixed.shape[2:])} are smaller than one "
                f"{self.scorer.patch}-voxel patch"
            )

    def _centre_mask(self, *images: Tensor) -> Tensor:
        """Patch-corner map ``(N, 1, *(S − patch + 1))``: the patch centre is foreground in
        any of ``images``."""
        r = self.scorer.patch // 2
        inside = torch.stack([x > self.foreground for x in images]).any(0)
        for a in range(self.ndim):
            inside = inside.narrow(a + 2, r, inside.shape[a + 2] - 2 * r)
        return inside

    # -- training: the patch classifier
    def score(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """The network's score of every patch pair (channel 0 fixed, 1 moving modality)."""
        return self.scorer(fixed, moving)

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        t, f = batch.target, batch.fixed
        want = (f.shape[0], 2, *f.shape[2:])
        if t is None or tuple(t.shape) != want:
            got = "none" if t is None else tuple(t.shape)
            raise ValueError(
                f"{self.name}: trained on aligned same-subject pairs of two modalities; the "
                f"batch needs target {want} (each image's counterpart in the other modality, "
                f"e.g. {SOURCE}), got {got}"
            )
        t = t.to(f.dtype)
        # aligned pairs (fixed modality, moving modality): the atlas's, then the subject's
        fix = unit_intensity(torch.cat([f, t[:, 1:]]))
        mov = unit_intensity(torch.cat([t[:, :1], batch.moving.to(f.dtype)]))
        n = mov.shape[0]
        direction = torch.randn(n, self.ndim, device=f.device)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-8)
        length = self.min_shift + (self.max_shift - self.min_shift) * torch.rand(n, 1)
        shifted = translate(mov, direction * length.to(f.device))
        if self.train_crop is not None:  # one random window of the pairs (the paper: patches)
            fix, mov, shifted = random_window((fix, mov, shifted), self.train_crop)
        mask = self._centre_mask(fix, mov)
        pos, neg = self.score(fix, mov), self.score(fix, shifted)
        hinge = hinge_loss(pos, neg, mask)
        w = mask.to(pos.dtype)
        with torch.no_grad():
            acc = 0.5 * (((pos > 0) * w).sum() + ((neg < 0) * w).sum()) / w.sum().clamp_min(1)
        return {"total": hinge, "hinge": hinge, "accuracy": acc.detach()}

    # -- registration with the metric
    def dissimilarity(self, fixed: Tensor, warped: Tensor, mask: Tensor | None) -> Tensor:
        """Per-pair loss ``(N,)`` of the registration: minus the mean learned score over
        patches centred in the fixed foreground (``mask``), or the configured similarity."""
        if not self.learned:
            return torch.stack(
                [
                    self.similarity(fixed[i : i + 1], warped[i : i + 1])["total"]
                    for i in range(fixed.shape[0])
                ]
            )
        s = self.score(fixed, warped)
        w = mask.to(s.dtype)
        return -(s * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1.0)

    def register_bspline(self, fixed: Tensor, moving: Tensor) -> tuple[Tensor, int]:
        """B-spline coefficients ``(N, D, *control)`` (voxels) and their spacing, coarse to
        fine, minimizing :meth:`dissimilarity` + ``bending_weight`` · bending energy; the
        gradient reaches the coefficients through the network (or the similarity)."""
        shape = tuple(fixed.shape[2:])
        fixed, moving = unit_intensity(fixed), unit_intensity(moving)
        mask = self._centre_mask(fixed)
        params: Tensor | None = None
        spacing = self.control_spacings[0]
        frozen = [p.requires_grad for p in self.parameters()]
        for p in self.parameters():
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                for level, (s, iters) in enumerate(
                    zip(self.control_spacings, self.iterations, strict=True)
                ):
                    if params is None:
                        lattice = control_lattice_shape(shape, [s] * self.ndim)
                        params = fixed.new_zeros(fixed.shape[0], self.ndim, *lattice)
                    else:
                        while spacing > s:
                            params = refine_bspline(params, shape, spacing)
                            spacing //= 2
                    spacing = s
                    c = nn.Parameter(params.detach().clone())
                    opt = torch.optim.Adam([c], lr=self.learning_rate / 2**level)
                    for _ in range(iters):
                        u = evaluate_bspline(c, [s] * self.ndim, shape)
                        warped = warp(moving, u)
                        loss = self.dissimilarity(fixed, warped, mask).sum()
                        if self.bending_weight:
                            loss = loss + self.bending_weight * bending_energy(u, reduction="sum")
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    params = c.detach()
        finally:
            for p, g in zip(self.parameters(), frozen, strict=True):
                p.requires_grad_(g)
        assert params is not None
        return params, spacing

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        """Training mode: the identity B-spline (training needs only the score network);
        eval mode: the B-spline registration with the learned metric."""
        self._check(fixed, moving)
        grid = grid if grid is not None else unit_grid(fixed)
        spacing = self.control_spacings[-1]
        if self.training:
            transform = BSplineTransform(grid, spacing, batch=fixed.shape[0])
            transform = transform.to(fixed.device)
        else:
            params, spacing = self.register_bspline(fixed, moving)
            transform = BSplineTransform(grid, spacing, params)
        return MethodOutput(transform, grid, moving)
