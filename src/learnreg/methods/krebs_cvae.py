"""Probabilistic diffeomorphic registration by a conditional VAE (Krebs et al. 2018/2019).

Krebs, Delingette, Mailhé, Ayache and Mansi, "Learning a probabilistic model for
diffeomorphic registration", IEEE TMI 2019 (DLMIA 2018 for the first version). The
deformation of a pair is encoded in a low-dimensional latent code ``z``:

* encoder ``q(z | fixed, moving)``: convolutions (stride 2) on the stacked pair, then fully
  connected layers to the mean and log-variance of ``z`` (``latent`` dimensions);
* decoder ``p(fixed | z, moving)``: ``z`` through a fully connected layer to a coarse feature
  map, then upsampling convolutions, *conditioned on the moving image* (the moving image,
  downsampled to each scale, is concatenated before every decoder block), to a stationary
  velocity at three scales (1/4, 1/2, 1 — the paper's multi-scale decoder); each velocity is
  smoothed by a Gaussian (``velocity_sigma`` voxels), exponentiated by scaling and squaring
  and warps the moving image at its scale;
* loss: ``image_weight`` × LCC (local cross-correlation) of the fixed and warped images,
  summed over the scales, + the KL divergence of ``q(z | ·)`` from ``N(0, I)``.

Training samples ``z = μ + σ ε``; prediction (``model.eval()``) uses ``z = μ`` and the finest
velocity; :meth:`KrebsCVAE.sample` draws several plausible deformations of one pair from the
posterior. The fully connected layers fix the network grid (:attr:`input_shape`). Scaled for
CPU: fewer channels than the paper (configurable) and 2D slices or 4 mm volumes; the image
weight (the likelihood's precision) was chosen on the tests' 2D slices (5000 among 100–20000).
The network is :class:`~learnreg.nn.cvae.ConditionalVAE`; its conditions are the moving image
anti-aliased (σ = factor/2) and resampled to each decoder scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.losses import functional as LF
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.cvae import ConditionalVAE
from learnreg.spatial.fields import resize_linear
from learnreg.spatial.filters import gaussian_blur
from learnreg.spatial.sampling import warp
from learnreg.spatial.svf import StationaryVelocityField

__all__ = ["KrebsCVAE", "gaussian_kl"]

SCALES = (4, 2, 1)
"""Downsampling factors of the decoder's velocity heads, coarse to fine."""


def gaussian_kl(mean: Tensor, log_variance: Tensor) -> Tensor:
    """``KL(N(μ, σ²) ‖ N(0, I))`` summed over the latent dimensions, per sample ``(N,)``."""
    return 0.5 * (mean.pow(2) + log_variance.exp() - 1 - log_variance).sum(1)


def _shrink(image: Tensor, shape: Sequence[int]) -> Tensor:
    """``image`` on the coarser grid of ``shape``: Gaussian anti-aliasing (σ = factor/2
    voxels, as the classical pyramid) then linear resampling with the same first and last
    voxel centres."""
    factor = image.shape[-1] / shape[-1]
    return resize_linear(gaussian_blur(image, factor / 2) if factor > 1 else image, shape)


@register_method(
    "krebs-cvae",
    year=2018,
    ndim="3D (2D by the same layers)",
    transform="stationary velocity field (diffeomorphic), sampled from a latent code",
    loss="LCC (multi-scale) + KL",
    supervision="unsupervised (probabilistic)",
    reference="Krebs et al., DLMIA 2018 / IEEE TMI 2019",
    aliases=("krebs", "krebs2018", "cvae"),
)
class KrebsCVAE(RegistrationMethod):
    """Krebs et al.'s conditional VAE (module docstring).

    Args:
        ndim: 2 or 3.
        shape: the network grid (fixed by the fully connected layers); sizes divisible by 8.
        latent: dimensions of ``z`` (the paper: 32 in 3D).
        enc_features: channels of the encoder's stride-2 convolutions (4 of them).
        dec_features: channels of the decoder blocks at 1/8, 1/4, 1/2 and 1.
        velocity_sigma: Gaussian smoothing of each velocity (voxels of its scale).
        integration_steps: scaling-and-squaring steps.
        window: LCC window (odd) at every scale.
        image_weight: weight of the LCC terms against the KL (the likelihood's precision).
        coord_conv: the encoder's first convolution as a CoordConv.
    """

    def __init__(
        self,
        ndim: int = 3,
        shape: Sequence[int] = (40, 48, 40),
        latent: int = 32,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 16),
        velocity_sigma: float = 1.0,
        integration_steps: int = 7,
        window: int = 9,
        image_weight: float = 5000.0,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        check_option("ndim", ndim, (2, 3))
        shape = tuple(int(s) for s in shape)
        if latent < 1 or image_weight <= 0 or integration_steps < 1 or window % 2 == 0:
            raise ValueError(
                f"krebs-cvae: need latent >= 1, image_weight > 0, integration_steps >= 1 and "
                f"an odd window; got {latent}, {image_weight}, {integration_steps}, {window}"
            )
        try:
            self.cvae = ConditionalVAE(ndim, shape, latent, enc_features, dec_features, coord_conv)
        except ValueError as e:
            raise ValueError(f"krebs-cvae: {e}") from None
        self.resolve(shape=list(shape))
        self.ndim, self.shape, self.latent = ndim, shape, int(latent)
        self.velocity_sigma, self.integration_steps = float(velocity_sigma), int(integration_steps)
        self.window, self.image_weight = int(window), float(image_weight)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def size_multiple(self) -> int:
        return 8

    def encode(self, fixed: Tensor, moving: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of ``q(z | fixed, moving)``, ``(N, latent)`` each."""
        return self.cvae.encode(torch.cat([moving, fixed], 1))

    def decode(self, z: Tensor, moving: Tensor) -> list[Tensor]:
        """Velocities at the scales :data:`SCALES` (coarse to fine), each smoothed, in voxels
        of its scale, from the code ``z`` and the moving image (the decoder's condition)."""
        conditions = [_shrink(moving, shape) for shape in self.cvae.decoder_shapes()]
        fields = self.cvae.decode(z, conditions)
        return [gaussian_blur(v, self.velocity_sigma) for v in fields]

    def check_pair(self, fixed: Tensor, moving: Tensor) -> None:
        want = (1, *self.shape)
        if fixed.shape != moving.shape or tuple(fixed.shape[1:]) != want:
            raise ValueError(
                f"krebs-cvae: fixed and moving must both be (N, {', '.join(map(str, want))}) "
                f"(its network grid); got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )

    def _output(self, z: Tensor, moving: Tensor, grid: Grid, extras: dict) -> MethodOutput:
        velocities = self.decode(z, moving)
        transform = StationaryVelocityField(grid, velocities[-1], self.integration_steps)
        return MethodOutput(transform, grid, moving, {**extras, "velocities": velocities, "z": z})

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        self.check_pair(fixed, moving)
        grid = unit_grid(fixed) if grid is None else grid
        mean, log_var = self.encode(fixed, moving)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean) if self.training else mean
        return self._output(z, moving, grid, {"mean": mean, "log_variance": log_var})

    @torch.no_grad()
    def sample(
        self,
        fixed: Tensor,
        moving: Tensor,
        n: int,
        grid: Grid | None = None,
        generator: torch.Generator | None = None,
    ) -> list[MethodOutput]:
        """``n`` deformations of the pair drawn from the posterior ``q(z | fixed, moving)``."""
        self.check_pair(fixed, moving)
        grid = unit_grid(fixed) if grid is None else grid
        mean, log_var = self.encode(fixed, moving)
        out = []
        for _ in range(n):
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            out.append(self._output(mean + torch.exp(0.5 * log_var) * eps, moving, grid, {}))
        return out

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        lcc = batch.fixed.new_zeros(())
        for factor, v in zip(SCALES, output.extras["velocities"], strict=True):
            shape = v.shape[2:]
            f = batch.fixed if factor == 1 else _shrink(batch.fixed, shape)
            m = batch.moving if factor == 1 else _shrink(batch.moving, shape)
            u = StationaryVelocityField(Grid(tuple(shape)), v, self.integration_steps).exp()
            term = LF.lncc(f, warp(m, u), window=min(self.window, 2 * (min(shape) // 2) - 1))
            terms[f"lcc_1/{factor}"] = term
            lcc = lcc + term
        kl = gaussian_kl(output.extras["mean"], output.extras["log_variance"]).mean()
        terms["kl"] = kl
        terms["total"] = self.image_weight * lcc + kl
        return terms
