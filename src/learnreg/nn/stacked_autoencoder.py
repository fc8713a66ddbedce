"""A stacked sparse auto-encoder of image patches and its dense (every-voxel) codes, 2D/3D.

Layer ``k`` is a one-hidden-layer auto-encoder of the layer below's code:
``h_k = sigmoid(W_k h_{k-1} + b_k)`` and ``ĥ_{k-1} = W'_k h_k + c_k`` (a sigmoid on ``ĥ`` for
``k > 1``, whose target is a sigmoid code), ``h_0`` the flattened patch. It is trained
greedily layer by layer — each layer reconstructs its (detached) input, with a KL sparsity
penalty on its mean activations and weight decay — and the whole stack is fine-tuned by the
reconstruction of the patch through every encoder and decoder (:meth:`losses`). The top code
is the patch's attribute vector.

Because the first encoder is fully connected on a ``p^D`` patch, applying it to the patch
around every voxel is a convolution with its weights reshaped to a ``p^D`` kernel, and the
layers above are ``1×1`` convolutions: :meth:`dense_codes` gives every voxel's attribute
vector in one pass, exactly the per-patch codes (zero padding outside the image).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StackedSparseAutoencoder", "extract_patches"]


def extract_patches(images: Tensor, centres: Tensor, patch: int) -> Tensor:
    """The ``patch^D`` patches of ``images`` ``(N, 1, *S)`` centred at ``centres`` ``(N, M, D)``
    (integer voxel indices; zero outside the image), flattened in row-major order:
    ``(N·M, patch^D)``."""
    n, c, *size = images.shape
    d = len(size)
    if c != 1 or centres.shape[0] != n or centres.shape[-1] != d or patch % 2 == 0:
        raise ValueError(
            f"extract_patches: need images (N, 1, *S), centres (N, M, {d}) and an odd patch; "
            f"got {tuple(images.shape)}, {tuple(centres.shape)}, {patch}"
        )
    r = patch // 2
    padded = F.pad(images, [r, r] * d)[:, 0].reshape(n, -1)
    psize = [s + 2 * r for s in size]
    strides = [math.prod(psize[i + 1 :]) for i in range(d)]
    axes = torch.meshgrid(*[torch.arange(patch)] * d, indexing="ij")
    offset = sum(a.reshape(-1) * s for a, s in zip(axes, strides, strict=True))
    start = sum(centres[..., i].long() * strides[i] for i in range(d))  # (N, M): corner in pad
    index = (start[..., None] + offset.to(start.device)).reshape(n, -1)
    return padded.gather(1, index).reshape(-1, patch**d)


def _kl_sparsity(code: Tensor, rho: float) -> Tensor:
    """``Σ_j KL(ρ ‖ ρ̂_j)``, ``ρ̂_j`` the mean activation of unit ``j`` over the batch."""
    q = code.mean(0).clamp(1e-6, 1 - 1e-6)
    return (rho * torch.log(rho / q) + (1 - rho) * torch.log((1 - rho) / (1 - q))).sum()


class StackedSparseAutoencoder(nn.Module):
    """Sparse auto-encoders stacked on ``patch^ndim`` patches (module docstring).

    Args:
        ndim: 2 or 3.
        patch: odd patch side (voxels).
        hidden: units per layer, bottom up; the last is the attribute vector's length.
        sparsity: target mean activation ``ρ`` of every hidden unit.
        sparsity_weight: weight ``β`` of the KL sparsity penalty.
        weight_decay: weight ``λ`` of ``λ/2 Σ‖W‖²`` over all encoder and decoder weights.
        corruption: fraction of each layer's inputs set to zero (denoising; 0 = off).
    """

    def __init__(
        self,
        ndim: int,
        patch: int,
        hidden: Sequence[int] = (64, 32),
        sparsity: float = 0.05,
        sparsity_weight: float = 0.1,
        weight_decay: float = 1e-4,
        corruption: float = 0.0,
    ) -> None:
        super().__init__()
        units = [int(h) for h in hidden]
        if ndim not in (2, 3) or patch < 1 or patch % 2 == 0 or not units or min(units) < 1:
            raise ValueError(
                f"StackedSparseAutoencoder: need ndim 2 or 3, an odd patch and positive hidden "
                f"units; got ndim={ndim}, patch={patch}, hidden={tuple(hidden)}"
            )
        if not 0 < sparsity < 1 or not 0 <= corruption < 1:
            raise ValueError(
                f"StackedSparseAutoencoder: sparsity must be in (0, 1) and corruption in [0, 1);"
                f" got {sparsity}, {corruption}"
            )
        self.ndim, self.patch = int(ndim), int(patch)
        self.sparsity, self.sparsity_weight = float(sparsity), float(sparsity_weight)
        self.weight_decay, self.corruption = float(weight_decay), float(corruption)
        sizes = [self.patch**self.ndim, *units]
        self.encoders = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.decoders = nn.ModuleList(
            nn.Linear(b, a) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )

    @property
    def code_size(self) -> int:
        return self.encoders[-1].out_features

    @property
    def input_size(self) -> int:
        return self.encoders[0].in_features

    def _check(self, patches: Tensor) -> None:
        if patches.dim() != 2 or patches.shape[1] != self.input_size:
            raise ValueError(
                f"StackedSparseAutoencoder: patches must be (B, {self.input_size}) (flattened "
                f"{self.patch}^{self.ndim}); got {tuple(patches.shape)}"
            )

    def _decode(self, k: int, code: Tensor) -> Tensor:
        out = self.decoders[k](code)
        return out if k == 0 else torch.sigmoid(out)

    def encode(self, patches: Tensor) -> list[Tensor]:
        """Every layer's code of ``patches`` ``(B, patch^D)``, bottom up."""
        self._check(patches)
        codes, h = [], patches
        for enc in self.encoders:
            h = torch.sigmoid(enc(h))
            codes.append(h)
        return codes

    def reconstruct(self, patches: Tensor) -> Tensor:
        """``patches`` through every encoder, then every decoder."""
        h = self.encode(patches)[-1]
        for k in reversed(range(len(self.decoders))):
            h = self._decode(k, h)
        return h

    def _corrupt(self, x: Tensor) -> Tensor:
        if not (self.training and self.corruption > 0):
            return x
        return x * (torch.rand_like(x) >= self.corruption).to(x.dtype)

    def losses(self, patches: Tensor, fine_tune: float = 1.0) -> dict[str, Tensor]:
        """Loss terms on ``patches``: per layer ``k`` (1-based) the mean squared
        reconstruction ``reconstruction_k`` of its detached input and its ``sparsity_k``
        (β·KL); ``fine_tune`` × the whole stack's reconstruction of the patches
        (``reconstruction``); ``weight_decay``; their sum ``total``. The detached inputs make
        each layer's own terms train that layer only — greedy layer-wise training, all layers
        at once."""
        self._check(patches)
        terms: dict[str, Tensor] = {}
        total = patches.new_zeros(())
        h = patches.detach()
        for k, enc in enumerate(self.encoders):
            code = torch.sigmoid(enc(self._corrupt(h)))
            rec = (self._decode(k, code) - h).square().mean()
            kl = self.sparsity_weight * _kl_sparsity(code, self.sparsity)
            terms[f"reconstruction_{k + 1}"], terms[f"sparsity_{k + 1}"] = rec, kl
            total = total + rec + kl
            h = torch.sigmoid(enc(h)).detach()  # the clean code feeds the next layer
        if fine_tune > 0:
            terms["reconstruction"] = (self.reconstruct(patches) - patches).square().mean()
            total = total + fine_tune * terms["reconstruction"]
        weights = [m.weight for m in (*self.encoders, *self.decoders)]
        terms["weight_decay"] = 0.5 * self.weight_decay * sum(w.square().sum() for w in weights)
        terms["total"] = total + terms["weight_decay"]
        return terms

    def dense_codes(self, images: Tensor) -> Tensor:
        """The top code of the patch around every voxel of ``images`` ``(N, 1, *S)``:
        ``(N, code_size, *S)`` (the first layer as a ``patch^D`` convolution, zero padding)."""
        d = self.ndim
        if images.dim() != d + 2 or images.shape[1] != 1:
            raise ValueError(
                f"StackedSparseAutoencoder: images must be (N, 1, *S) with {d} spatial dims; "
                f"got {tuple(images.shape)}"
            )
        first = self.encoders[0]
        kernel = first.weight.reshape(first.out_features, 1, *[self.patch] * d)
        conv = F.conv2d if d == 2 else F.conv3d
        h = torch.sigmoid(conv(images, kernel, first.bias, padding=self.patch // 2))
        for enc in self.encoders[1:]:
            h = torch.sigmoid(torch.einsum("oc,nc...->no...", enc.weight, h) + _bias(enc, d))
        return h


def _bias(layer: nn.Linear, d: int) -> Tensor:
    return layer.bias.reshape(1, -1, *[1] * d)
