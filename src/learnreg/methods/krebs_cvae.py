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
weight (the likelihood's precision) was chosen on training data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnreg.core.grid import Grid
from learnreg.core.options import check_option
from learnreg.losses import functional as LF
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.blocks import ConvBlock, CoordConv, FlowHead
from learnreg.spatial.filters import gaussian_blur
from learnreg.spatial.sampling import warp
from learnreg.spatial.svf import StationaryVelocityField

__all__ = ["KrebsCVAE", "gaussian_kl"]

SCALES = (4, 2, 1)
"""Downsampling factors of the decoder's velocity heads, coarse to fine."""


def gaussian_kl(mean: Tensor, log_variance: Tensor) -> Tensor:
    """``KL(N(μ, σ²) ‖ N(0, I))`` summed over the latent dimensions, per sample ``(N,)``."""
    return 0.5 * (mean.pow(2) + log_variance.exp() - 1 - log_variance).sum(1)


def _resize(x: Tensor, shape: Sequence[int]) -> Tensor:
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=tuple(shape), mode=mode, align_corners=False)


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
        if len(shape) != ndim or any(s % 8 or s < 8 for s in shape):
            raise ValueError(f"krebs-cvae: shape must be {ndim} sizes divisible by 8, got {shape}")
        if len(enc_features) != 4 or len(dec_features) != 4:
            raise ValueError("krebs-cvae: enc_features and dec_features need 4 entries each")
        if latent < 1 or image_weight <= 0 or integration_steps < 1 or window % 2 == 0:
            raise ValueError(
                f"krebs-cvae: need latent >= 1, image_weight > 0, integration_steps >= 1 and "
                f"an odd window; got {latent}, {image_weight}, {integration_steps}, {window}"
            )
        self.resolve(shape=list(shape))
        self.ndim, self.shape, self.latent = ndim, shape, int(latent)
        self.velocity_sigma, self.integration_steps = float(velocity_sigma), int(integration_steps)
        self.window, self.image_weight = int(window), float(image_weight)
        enc, cin = [], 2
        for i, f in enumerate(enc_features):
            block = CoordConv if coord_conv and i == 0 else ConvBlock
            enc.append(block(ndim, cin, int(f), stride=2))
            cin = int(f)
        self.encoder = nn.Sequential(*enc)
        encoded = shape
        for _ in enc_features:  # each stride-2 convolution (padding 1) halves, rounding up
            encoded = tuple(-(-s // 2) for s in encoded)
        flat = cin * int(torch.tensor(encoded).prod())
        self.to_mean = nn.Linear(flat, self.latent)
        self.to_log_variance = nn.Linear(flat, self.latent)
        nn.init.zeros_(self.to_log_variance.weight)
        nn.init.constant_(self.to_log_variance.bias, -4.0)
        self.coarse = tuple(s // 8 for s in shape)
        c0 = int(dec_features[0])
        self.from_latent = nn.Linear(self.latent, c0 * int(torch.tensor(self.coarse).prod()))
        blocks, cin = [], c0
        for f in dec_features:
            blocks.append(ConvBlock(ndim, cin + 1, int(f)))  # + the moving image at that scale
            cin = int(f)
        self.decoder = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(FlowHead(ndim, int(f)) for f in dec_features[1:])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def size_multiple(self) -> int:
        return 8

    def encode(self, fixed: Tensor, moving: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of ``q(z | fixed, moving)``, ``(N, latent)`` each."""
        h = self.encoder(torch.cat([moving, fixed], 1))
        h = h.flatten(1)
        return self.to_mean(h), self.to_log_variance(h)

    def decode(self, z: Tensor, moving: Tensor) -> list[Tensor]:
        """Velocities at the scales :data:`SCALES` (coarse to fine), each smoothed, in voxels
        of its scale, from the code ``z`` and the moving image."""
        x = self.from_latent(z).view(z.shape[0], -1, *self.coarse)
        velocities = []
        for i, block in enumerate(self.decoder):
            if i:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([x, _resize(moving, x.shape[2:])], 1))
            if i:
                v = self.heads[i - 1](x)
                velocities.append(gaussian_blur(v, self.velocity_sigma))
        return velocities

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
            f = batch.fixed if factor == 1 else _resize(batch.fixed, shape)
            m = batch.moving if factor == 1 else _resize(batch.moving, shape)
            u = StationaryVelocityField(Grid(tuple(shape)), v, self.integration_steps).exp()
            term = LF.lncc(f, warp(m, u), window=min(self.window, 2 * (min(shape) // 2) - 1))
            terms[f"lcc_1/{factor}"] = term
            lcc = lcc + term
        kl = gaussian_kl(output.extras["mean"], output.extras["log_variance"]).mean()
        terms["kl"] = kl
        terms["total"] = self.image_weight * lcc + kl
        return terms
