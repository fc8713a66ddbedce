"""Patch-wise application of a network to a whole image (Quicksilver's prediction scheme).

A network that maps patches of size ``p`` to patches of size ``p`` is applied to an image by
tiling it with patches ``stride`` apart (the last one flush with the far border) and averaging
the outputs where patches overlap. Images smaller than a patch are zero-padded to it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["patch_starts", "apply_patchwise", "random_corners", "crop_patches"]


def patch_starts(size: int, patch: int, stride: int, offset: int = 0) -> list[int]:
    """Starts of patches covering ``[0, size)``: ``0`` (when ``offset > 0``), ``offset``,
    ``offset + stride``, ... and ``size − patch`` last (``size ≥ patch``)."""
    if size < patch or stride < 1 or not 0 <= offset < max(stride, 1):
        raise ValueError(
            f"patch_starts: size {size}, patch {patch}, stride {stride}, offset {offset}"
        )
    starts = list(range(offset, size - patch + 1, stride))
    if offset > 0:
        starts = [0, *starts]
    if not starts or starts[-1] != size - patch:
        starts.append(size - patch)
    return sorted(set(starts))


def apply_patchwise(
    network: Callable[[Tensor], Tensor],
    images: Tensor,
    patch: int,
    stride: int,
    out_channels: int,
    chunk: int = 64,
) -> Tensor:
    """``network`` over patches of ``images`` ``(N, C, *S)``: ``(N, out_channels, *S)``, the
    average of the overlapping patch outputs. Patches are evaluated ``chunk`` at a time."""
    n, _, *size = images.shape
    padded = [max(s, patch) for s in size]
    pad = []
    for s, p in zip(reversed(size), reversed(padded), strict=True):
        pad += [0, p - s]
    x = F.pad(images, pad) if any(pad) else images
    starts = [patch_starts(s, patch, stride) for s in padded]
    corners = list(itertools.product(*starts))
    window = [slice(None), slice(None)]
    out = images.new_zeros(n, out_channels, *padded)
    count = images.new_zeros(1, 1, *padded)
    for i in range(0, len(corners), chunk):
        part = corners[i : i + chunk]
        crops = [x[tuple(window + [slice(c, c + patch) for c in corner])] for corner in part]
        pred = network(torch.cat(crops)).split(n)
        for corner, p in zip(part, pred, strict=True):
            where = tuple(window + [slice(c, c + patch) for c in corner])
            out[where] = out[where] + p
            count[where] = count[where] + 1
    out = out / count
    return out[tuple(window + [slice(0, s) for s in size])]


def random_corners(
    images: Tensor, patch: int, count: int, generator: torch.Generator | None = None
) -> Tensor:
    """``(N, count, D)`` random patch corners per image of ``images`` ``(N, C, *S)``
    (``S ≥ patch``), preferring patches with content: of ``4 · count`` uniform candidates,
    the first ``count`` whose patch is not all zero (others fill up when too few are)."""
    n, _, *size = images.shape
    if any(s < patch for s in size):
        raise ValueError(f"random_corners: images {tuple(size)} smaller than a {patch} patch")
    high = torch.tensor([s - patch + 1 for s in size])
    cand = (torch.rand(n, 4 * count, len(size), generator=generator) * high).long()
    out = []
    for i in range(n):
        nonzero = [
            bool(crop_patches(images[i : i + 1], cand[i : i + 1, j : j + 1], patch).abs().max() > 0)
            for j in range(cand.shape[1])
        ]
        order = sorted(range(cand.shape[1]), key=lambda j: not nonzero[j])
        out.append(cand[i, order[:count]])
    return torch.stack(out)


def crop_patches(images: Tensor, corners: Tensor, patch: int) -> Tensor:
    """Patches ``(N · K, C, patch, ...)`` of ``images`` ``(N, C, *S)`` at ``corners``
    ``(N, K, D)`` (pair-major: the ``K`` patches of image 0 first)."""
    n, k, d = corners.shape
    crops = []
    for i in range(n):
        for j in range(k):
            where = [slice(None)] + [slice(int(c), int(c) + patch) for c in corners[i, j]]
            crops.append(images[i][tuple(where)])
    return torch.stack(crops)
