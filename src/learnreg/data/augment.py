"""Random spatial and intensity augmentation, reproducible through a ``torch.Generator``.

Spatial augmentation draws one transform per sample — a random affine (rotation, scale,
translation about the grid centre) plus a random elastic displacement (Gaussian-smoothed
noise) — as a displacement in voxel units of the network grid, and applies the *same*
displacement to the image (linear) and its label map (label-safe: one-hot linear + argmax),
so they stay aligned. Intensity augmentation (gamma, contrast about the mean, Gaussian noise)
touches images only. All random numbers come from the generator passed in, on the CPU, so a
generator seeded the same way gives the same augmentation on any device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from learnreg.core.grid import Grid
from learnreg.data.preprocess import sample_labels_index
from learnreg.spatial.filters import gaussian_blur
from learnreg.spatial.linear import rotation_matrix
from learnreg.spatial.sampling import warp

__all__ = ["AugmentConfig", "Augmenter", "random_displacement", "augment_intensity"]


@dataclass
class AugmentConfig:
    """Ranges of the random augmentation; zeros switch a part off.

    Args:
        rotation: maximum absolute rotation per rotation axis, degrees.
        scale: maximum relative scale change per axis (``0.1`` → ``[0.9, 1.1]``).
        translation: maximum absolute translation per axis, voxels.
        elastic: standard deviation of the elastic displacement, voxels.
        elastic_sigma: smoothing of the elastic noise, voxels.
        gamma: ``log γ`` uniform in ``[-gamma, gamma]`` (``x ↦ x**γ`` on ``[0, 1]`` images).
        contrast: contrast factor in ``[1 - contrast, 1 + contrast]`` about the mean.
        noise: maximum standard deviation of additive Gaussian noise.
        probability: probability of augmenting each image of a pair.
    """

    rotation: float = 0.0
    scale: float = 0.0
    translation: float = 0.0
    elastic: float = 0.0
    elastic_sigma: float = 4.0
    gamma: float = 0.0
    contrast: float = 0.0
    noise: float = 0.0
    probability: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = float(getattr(self, f.name))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"augment.{f.name} must be >= 0, got {v}")
            setattr(self, f.name, v)
        if self.probability > 1:
            raise ValueError(f"augment.probability must be <= 1, got {self.probability}")
        if self.scale >= 1 or self.contrast >= 1:
            raise ValueError("augment.scale and augment.contrast must be < 1")

    @property
    def spatial(self) -> bool:
        return any(v > 0 for v in (self.rotation, self.scale, self.translation, self.elastic))

    @property
    def intensity(self) -> bool:
        return any(v > 0 for v in (self.gamma, self.contrast, self.noise))

    @property
    def enabled(self) -> bool:
        return self.probability > 0 and (self.spatial or self.intensity)

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(g: torch.Generator, n: int, bound: float) -> torch.Tensor:
    return (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * bound


def random_displacement(
    shape: tuple[int, ...], config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """One random affine + elastic displacement ``(1, D, *shape)``, voxel units (float32)."""
    d = len(shape)
    nrot = 1 if d == 2 else 3
    omega = _uniform(generator, nrot, math.radians(config.rotation))
    scale = 1 + _uniform(generator, d, config.scale)
    trans = _uniform(generator, d, config.translation)
    noise = torch.randn((1, d, *shape), generator=generator) if config.elastic > 0 else None
    lin = rotation_matrix(omega.unsqueeze(0))[0] @ torch.diag(scale)  # (D, D) float64
    grid = Grid(tuple(shape))
    pts = grid.index_points(torch.float64)
    centre = torch.tensor(grid.index_center, dtype=torch.float64)
    mapped = (pts - centre) @ lin.T + centre + trans
    u = (mapped - pts).movedim(-1, 0).unsqueeze(0).to(torch.float32)
    if noise is not None:
        smooth = gaussian_blur(noise, config.elastic_sigma)
        smooth = smooth / smooth.std().clamp_min(1e-12) * config.elastic
        u = u + smooth
    return u


def augment_intensity(
    image: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Gamma, contrast and noise on one image ``(C, *S)`` (values kept in ``[0, 1]``)."""
    x = image
    dev = x.device
    if config.gamma > 0:
        g = math.exp(float(_uniform(generator, 1, config.gamma)))
        x = x.clamp(0, 1) ** g
    if config.contrast > 0:
        c = 1 + float(_uniform(generator, 1, config.contrast))
        m = x.mean()
        x = (x - m) * c + m
    if config.noise > 0:
        sd = float(torch.rand(1, generator=generator)) * config.noise
        x = x + sd * torch.randn(x.shape, generator=generator).to(dev, x.dtype)
    return x.clamp(0, 1)


class Augmenter:
    """Augments the fixed and the moving image of each pair independently.

    ``augmenter(item, generator)`` takes a dataset item (or the fixed/moving tensors of a
    batch through :meth:`augment_image`) and returns augmented copies; labels follow their
    image's spatial transform.
    """

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config

    def augment_image(
        self,
        image: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment one image ``(1, *S)`` and its labels ``(1, *S)`` (or ``None``)."""
        cfg = self.config
        if not cfg.enabled or float(torch.rand(1, generator=generator)) >= cfg.probability:
            return image, labels
        shape = tuple(image.shape[1:])
        if cfg.spatial:
            u = random_displacement(shape, cfg, generator).to(image.device)
            image = warp(image.unsqueeze(0), u.to(image.dtype), "linear", "zeros")[0]
            if labels is not None:
                pts = Grid(shape).index_points(torch.float32, u.device)
                pts = pts.unsqueeze(0) + u.movedim(1, -1)
                labels = sample_labels_index(labels.unsqueeze(0), pts)[0]
        if cfg.intensity:
            image = augment_intensity(image, cfg, generator)
        return image, labels

    def __call__(self, item: dict, generator: torch.Generator) -> dict:
        out = dict(item)
        for role in ("fixed", "moving"):
            img, lab = self.augment_image(item[role], item.get(f"{role}_labels"), generator)
            out[role] = img
            if lab is not None:
                out[f"{role}_labels"] = lab
        return out
