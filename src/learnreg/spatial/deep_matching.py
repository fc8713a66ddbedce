"""Deep matching: quasi-dense, non-rigid patch matches of two 2D images (Weinzaepfel et al.).

Weinzaepfel, Revaud, Harchaoui and Schmid, "DeepFlow: large displacement optical flow with
deep matching", ICCV 2013, Sec. 3 (and Revaud et al., IJCV 2016, which details it). A
multi-layer correlation pyramid with no learned weights ("deep" by its architecture):

- **descriptors**: at every pixel, the gradient projected on 8 orientations (rectified,
  Gaussian-pooled) plus a constant "no gradient" bin, L2-normalized; an *atomic patch* of
  4×4 pixels is described by its 16 pixel descriptors (144 numbers, L2-normalized, SIFT-like);
- **level 1**: the fixed image is cut into non-overlapping 4×4 atomic patches; each is
  correlated (cosine, ≥ 0) with the 4×4 patch at *every* position of the moving image;
- **bottom-up aggregation** (levels 2 … ``levels``, patch sizes 8 … 128 pixels for six
  levels): the child correlation maps are max-pooled (3×3) and subsampled by 2, then a
  patch of size ``N`` — the 2×2 group of its quadrants, patches of size ``N/2`` — averages
  its four children's pooled maps, each shifted by its quadrant's offset (±1 pooled pixel),
  and the average is rectified (``C ← C^λ``, λ = 1.4). The max-pooling lets each quadrant
  move a little on its own: the match is non-rigid at every scale;
- **top-down backtracking**: from the local maxima of every top-level map, each match
  descends to its four quadrants, each taking the position of the maximum that its pooled
  value came from; a child's score is its parent's plus its own correlation, duplicates
  keep the best score. At the bottom every atomic patch has candidate positions; its best
  one is kept when it is also the best match landing in its 4×4 cell of the moving image
  (the reciprocal check), giving one match per kept atomic patch, scored by its mean
  correlation along the path.

Parents overlap (every atomic patch position starts a patch at each level, the quadrants of
a level-``k`` patch being ``2^(k−2)`` atomic patches apart), as in the original; the maps of
all levels are kept in memory, ``O(P · H · W)`` for ``P = HW/16`` atomic patches, so
:func:`deep_matching` works on images of at most ``max_size`` pixels per side (resampling
larger ones, matches mapped back) — a CPU-scale limit, the paper matched full video frames.
Deviations: per patch and level only the ``keep`` best backtracked candidates
are followed (the original follows all of them, with its own pruning); the reciprocal check
is done on the backtracked candidates instead of a second matching from moving to fixed.
Inherently 2D (as the paper): 3D volumes would need ``O(V²/64)`` correlation memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from learnreg.core.errors import InputError
from learnreg.spatial.differential import spatial_gradient
from learnreg.spatial.fields import resize_linear
from learnreg.spatial.filters import gaussian_blur

__all__ = ["ATOM", "Matches", "pixel_descriptors", "correlation_pyramid", "deep_matching"]

ATOM = 4
"""Side of an atomic patch, pixels."""


@dataclass
class Matches:
    """Point matches fixed → moving, in voxel index coordinates of the images matched.

    ``fixed`` ``(K, 2)``: centres of the matched atomic patches of the fixed image;
    ``moving`` ``(K, 2)``: where they were found in the moving image; ``scores`` ``(K,)``:
    mean correlation along the backtracked path (in ``[0, 1]``, higher is better).
    """

    fixed: Tensor
    moving: Tensor
    scores: Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())

    @property
    def displacements(self) -> Tensor:
        """``moving − fixed`` ``(K, 2)``, voxels."""
        return self.moving - self.fixed


def pixel_descriptors(image: Tensor, sigma: float = 1.0, no_gradient: float = 0.3) -> Tensor:
    """Dense descriptors ``(1, 9, H, W)`` of a 2D image ``(1, 1, H, W)``: its gradient (after
    a σ-blur) projected on 8 orientations and rectified, Gaussian-pooled (σ), plus a ninth
    bin of ``no_gradient`` times the mean gradient magnitude, L2-normalized per pixel."""
    smooth = gaussian_blur(image, sigma)
    grad = spatial_gradient(smooth)[:, 0]  # (1, 2, H, W): d/dy, d/dx
    angles = torch.arange(8, dtype=image.dtype, device=image.device) * (math.pi / 4)
    dirs = torch.stack([torch.sin(angles), torch.cos(angles)], 1)  # (8, 2) (y, x)
    hist = F.relu(torch.einsum("kd,ndhw->nkhw", dirs, grad))
    hist = gaussian_blur(hist, sigma)
    flat = grad.norm(dim=1, keepdim=True).mean().clamp_min(1e-12) * no_gradient
    desc = torch.cat([hist, flat.expand_as(hist[:, :1])], 1)
    return F.normalize(desc, dim=1)


def _patch_descriptors(desc: Tensor, stride: int) -> tuple[Tensor, tuple[int, int]]:
    """Atomic patch descriptors ``(L, C·16)`` (L2-normalized) at positions of ``stride``, and
    the shape of their position grid."""
    h, w = desc.shape[2:]
    cols = F.unfold(desc, ATOM, stride=stride)[0]  # (C·16, L)
    grid = ((h - ATOM) // stride + 1, (w - ATOM) // stride + 1)
    return F.normalize(cols, dim=0).T, grid


def _aggregate(pooled: Tensor, offset: int, power: float) -> Tensor:
    """Parent maps ``(n, m, h, w)`` of child maps pooled and subsampled ``(n, m, h, w)``:
    parent ``(i, j)``'s quadrants are the children ``(i + offset·a, j + offset·b)``,
    ``a, b ∈ {0, 1}``, whose maps are shifted by ``2a, 2b`` pooled pixels; the mean over the
    children inside the grid, raised to ``power``."""
    n, m, h, w = pooled.shape
    padded = F.pad(pooled, (0, 2, 0, 2, 0, offset, 0, offset))  # zeros past every border
    total = torch.zeros_like(pooled)
    count = torch.zeros(n, m, 1, 1, dtype=pooled.dtype, device=pooled.device)
    for a in (0, 1):
        for b in (0, 1):
            oi, oj = offset * a, offset * b
            total += padded[oi : oi + n, oj : oj + m, 2 * a : 2 * a + h, 2 * b : 2 * b + w]
            valid = torch.zeros(n, m, 1, 1, dtype=pooled.dtype, device=pooled.device)
            valid[: max(0, n - oi), : max(0, m - oj)] = 1
            count += valid
    return (total / count).pow(power)


def correlation_pyramid(
    fixed: Tensor, moving: Tensor, levels: int = 6, power: float = 1.4
) -> tuple[list[Tensor], list[Tensor]]:
    """The bottom-up pyramid of two 2D images ``(1, 1, H, W)``.

    Returns ``maps`` (level 1 first), ``maps[k]`` ``(n, m, h_k, w_k)``: the correlation of
    the level-``k+1`` patch starting at atomic patch ``(i, j)`` of the fixed image with the
    moving image at map position ``(y, x)`` (pixel ``2^k·(y, x)`` for its top-left atomic
    patch), and ``argmax[k]`` (``k < levels − 1``): for every pooled position of ``maps[k]``
    the flat index in ``maps[k]``'s plane of the maximum it pooled.
    """
    d1, d2 = pixel_descriptors(fixed), pixel_descriptors(moving)
    p1, (n, m) = _patch_descriptors(d1, ATOM)
    p2, (h, w) = _patch_descriptors(d2, 1)
    maps = [(p1 @ p2.T).clamp_min(0).reshape(n, m, h, w)]
    argmax: list[Tensor] = []
    for k in range(1, levels):
        child = maps[-1]
        ch, cw = child.shape[2:]
        pooled, idx = F.max_pool2d(
            child.reshape(1, n * m, ch, cw), 3, stride=2, padding=1, return_indices=True
        )
        pooled = pooled.reshape(n, m, *pooled.shape[2:])
        argmax.append(idx.reshape(n, m, *idx.shape[2:]))
        maps.append(_aggregate(pooled, 2 ** (k - 1), power))
    return maps, argmax


def _keep_best(patch: Tensor, pos: Tensor, score: Tensor, keep: int, size: int):
    """Deduplicate candidates ``(patch, flat position)`` keeping the best score, then the
    ``keep`` best candidates of each patch."""
    key = patch * size + pos
    uniq, inverse = torch.unique(key, return_inverse=True)
    best = torch.full(uniq.shape, -1.0, dtype=score.dtype, device=score.device)
    best = best.scatter_reduce(0, inverse, score, reduce="amax")
    patch, pos = uniq // size, uniq % size
    order = torch.argsort(best, descending=True, stable=True)
    order = order[torch.argsort(patch[order], stable=True)]  # by patch, best first
    patch, pos, best = patch[order], pos[order], best[order]
    starts = torch.searchsorted(patch, patch, side="left")
    rank = torch.arange(len(patch), device=patch.device) - starts
    sel = rank < keep
    return patch[sel], pos[sel], best[sel]


def _backtrack(maps: list[Tensor], argmax: list[Tensor], keep: int):
    """Top-down: candidates (atomic patch, level-1 flat position, summed score)."""
    top = maps[-1]
    n, m, h, w = top.shape
    peaks = top == F.max_pool2d(top.reshape(1, n * m, h, w), 3, 1, 1).reshape(top.shape)
    patch_id, pos = peaks.reshape(n * m, h * w).nonzero(as_tuple=True)
    score = top.reshape(n * m, h * w)[patch_id, pos]
    patch_id, pos, score = _keep_best(patch_id, pos, score, keep, h * w)
    for k in range(len(maps) - 2, -1, -1):
        offset = 2**k
        child, idx = maps[k], argmax[k]
        ch, cw = child.shape[2:]
        ph, pw = idx.shape[2:]
        pi, pj = patch_id // m, patch_id % m
        y, x = pos // w, pos % w
        new_patch, new_pos, new_score = [], [], []
        for a in (0, 1):
            for b in (0, 1):
                ci, cj, py, px = pi + offset * a, pj + offset * b, y + 2 * a, x + 2 * b
                ok = (ci < n) & (cj < m) & (py < ph) & (px < pw)
                ci, cj, py, px, s = ci[ok], cj[ok], py[ok], px[ok], score[ok]
                flat = idx[ci, cj, py, px]
                new_patch.append(ci * m + cj)
                new_pos.append(flat)
                new_score.append(s + child.reshape(n, m, -1)[ci, cj, flat])
        patch_id, pos, score = _keep_best(
            torch.cat(new_patch), torch.cat(new_pos), torch.cat(new_score), keep, ch * cw
        )
        h, w = ch, cw
    return patch_id, pos, score / len(maps)


def deep_matching(
    fixed: Tensor,
    moving: Tensor,
    levels: int = 6,
    power: float = 1.4,
    keep: int = 4,
    max_size: int = 128,
    reciprocal: bool = True,
) -> Matches:
    """Deep matching of two 2D images ``(1, 1, H, W)`` (module doc): one match per kept
    atomic patch, in voxel coordinates of the given images.

    Args:
        levels: layers of the pyramid (the paper: 6, patches of 4 to 128 pixels).
        power: the rectification exponent λ of every aggregated map.
        keep: candidates followed per patch and level in the backtracking.
        max_size: images with a side larger than this are matched resampled to it
            (memory grows as the square of the pixel count).
        reciprocal: keep only matches that are also the best landing in their 4×4 cell of
            the moving image.
    """
    if fixed.dim() != 4 or fixed.shape[:2] != (1, 1) or moving.shape != fixed.shape:
        raise InputError(
            "deep_matching: needs two 2D images (1, 1, H, W) of the same shape; got "
            f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
        )
    if levels < 1 or keep < 1 or max_size < 2 * ATOM:
        raise InputError(
            f"deep_matching: levels and keep must be >= 1 and max_size >= {2 * ATOM}; got "
            f"{levels}, {keep}, {max_size}"
        )
    shape = fixed.shape[2:]
    if min(shape) < 2 * ATOM:
        raise InputError(f"deep_matching: images of {tuple(shape)} pixels are too small")
    scale = min(1.0, max_size / max(shape))
    small = tuple(max(2 * ATOM, round(s * scale)) for s in shape)
    f, mv = fixed.float(), moving.float()
    if small != tuple(shape):
        sigma = 0.5 * (1 / scale - 1)
        f, mv = (resize_linear(gaussian_blur(t, sigma), small) for t in (f, mv))
    maps, argmax = correlation_pyramid(f, mv, levels, power)
    patch_id, pos, score = _backtrack(maps, argmax, keep)
    n, m, _, w = maps[0].shape
    # the best candidate of every atomic patch (sorted by patch, best first)
    first = torch.ones_like(patch_id, dtype=torch.bool)
    first[1:] = patch_id[1:] != patch_id[:-1]
    patch_id, pos, score = patch_id[first], pos[first], score[first]
    y, x = pos // w, pos % w
    if reciprocal and len(score):
        cell = (y // ATOM) * (w // ATOM + 1) + x // ATOM
        best = torch.full((int(cell.max()) + 1,), -1.0, dtype=score.dtype)
        best = best.scatter_reduce(0, cell, score, reduce="amax")
        ok = score >= best[cell]
        patch_id, y, x, score = patch_id[ok], y[ok], x[ok], score[ok]
    centre = (ATOM - 1) / 2
    src = torch.stack([(patch_id // m) * ATOM, (patch_id % m) * ATOM], 1).to(f.dtype) + centre
    dst = torch.stack([y, x], 1).to(f.dtype) + centre
    ratio = torch.tensor(
        [(s - 1) / (t - 1) for s, t in zip(shape, small, strict=True)], dtype=f.dtype
    )
    return Matches(src * ratio, dst * ratio, score)
