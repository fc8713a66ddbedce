"""Registration metrics: Dice, surface distances (HD95), TRE, Jacobian statistics, inverse
consistency. Numpy or torch in, plain Python floats / dicts out; 2D and 3D; spacing-aware.

Definitions follow the Learn2Reg evaluation code where it has one (see each function).
Label maps and displacement fields are in array index order ``(i, j[, k])`` on the fixed grid;
displacements are in voxel units of that grid unless stated otherwise.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from learnreg.spatial.differential import jacobian_determinant
from learnreg.spatial.sampling import warp

__all__ = [
    "dice_per_label",
    "mean_dice",
    "surface_distances",
    "robust_hausdorff",
    "hausdorff_distance",
    "hd95",
    "tre",
    "jacobian_stats",
    "inverse_consistency_error",
]

ArrayLike = np.ndarray | torch.Tensor


# ---------------------------------------------------------------------------- helpers
def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels_np(x: ArrayLike, ndim: int | None = None) -> np.ndarray:
    """Integer label map; leading singleton (batch/channel) axes dropped down to ``ndim``."""
    a = _np(x)
    while a.ndim > (ndim or 3) and a.shape[0] == 1:
        a = a[0]
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"expected a {ndim}D label map, got shape {a.shape}")
    if a.dtype.kind == "f":
        a = np.rint(a)
    return a.astype(np.int64, copy=False) if a.dtype.kind not in "iub" else a


def _pair(fixed: ArrayLike, warped: ArrayLike, ndim: int | None = None):
    f, w = _labels_np(fixed, ndim), _labels_np(warped, ndim)
    if f.shape != w.shape:
        raise ValueError(f"label maps differ in shape: {f.shape} vs {w.shape}")
    return f, w


def _label_list(fixed: np.ndarray, labels: Sequence[int] | None) -> list[int]:
    if labels is None:
        return [int(v) for v in np.unique(fixed) if v != 0]
    return [int(v) for v in labels]


# ---------------------------------------------------------------------------- Dice
def dice_per_label(
    fixed_labels: ArrayLike, warped_labels: ArrayLike, labels: Sequence[int] | None = None
) -> dict[int, float]:
    """Dice ``2|F∩W| / (|F|+|W|)`` per label.

    ``labels`` defaults to the nonzero labels of the fixed map. A label absent from both maps
    gives NaN (surface-distance's ``compute_dice_coefficient``), present in one only gives 0.
    """
    f, w = _pair(fixed_labels, warped_labels)
    lab = _label_list(f, labels)
    if not lab:
        return {}
    ref = np.asarray(sorted(set(lab)), dtype=np.int64)
    k = len(ref)

    def index(a: np.ndarray) -> np.ndarray:  # position in ref, k for "other"
        a = a.ravel().astype(np.int64)
        pos = np.clip(np.searchsorted(ref, a), 0, k - 1)
        return np.where(ref[pos] == a, pos, k)

    fi, wi = index(f), index(w)
    joint = np.bincount(fi * (k + 1) + wi, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
    nf, nw, inter = joint.sum(1), joint.sum(0), np.diag(joint)
    out = {}
    for lbl in lab:
        p = int(np.searchsorted(ref, lbl))
        denom = nf[p] + nw[p]
        out[lbl] = float("nan") if denom == 0 else float(2.0 * inter[p] / denom)
    return out


def mean_dice(
    fixed_labels: ArrayLike, warped_labels: ArrayLike, labels: Sequence[int] | None = None
) -> float:
    """Mean of :func:`dice_per_label` over labels, ignoring NaN (labels absent from both)."""
    vals = np.array(list(dice_per_label(fixed_labels, warped_labels, labels).values()))
    return float(np.nanmean(vals)) if vals.size and not np.isnan(vals).all() else float("nan")


# ---------------------------------------------------------------------------- surfaces
def _corner_weight(corner: tuple[int, ...]) -> int:
    """Bit of a 2^D-neighbourhood corner: surface-distance's kernels ``[[8,4],[2,1]]`` and
    ``[[[128,64],[32,16]],[[8,4],[2,1]]]``."""
    d = len(corner)
    return 1 << (2**d - 1 - sum(o << (d - 1 - a) for a, o in enumerate(corner)))


def _faces(ndim: int) -> list[list[tuple[int, ...]]]:
    """Faces of the unit square / cube, each as its corners in cyclic order."""
    ring = [(0, 0), (1, 0), (1, 1), (0, 1)]
    if ndim == 2:
        return [ring]
    faces = []
    for ax in range(3):
        others = [a for a in range(3) if a != ax]
        for v in (0, 1):
            face = []
            for p, q in ring:
                c = [0, 0, 0]
                c[ax], c[others[0]], c[others[1]] = v, p, q
                face.append(tuple(c))
            faces.append(face)
    return faces


def _fan(poly: list[np.ndarray]) -> list[np.ndarray]:
    """Area vectors of a fan triangulation of a (possibly non-planar) polygon, fanned from the
    vertex that splits it into the fewest distinct planes (first such vertex)."""
    best: list[np.ndarray] = []
    best_planes = None
    n = len(poly)
    for s in range(n):
        tris = [
            0.5 * np.cross(poly[(s + i) % n] - poly[s], poly[(s + i + 1) % n] - poly[s])
            for i in range(1, n - 1)
        ]
        dirs: list[np.ndarray] = []
        for t in tris:
            u = t / np.linalg.norm(t)
            if not any(abs(abs(u @ v) - 1) < 1e-9 for v in dirs):
                dirs.append(u)
        if best_planes is None or len(dirs) < best_planes:
            best, best_planes = tris, len(dirs)
    return best


@functools.lru_cache(maxsize=2)
def _measure_vectors(ndim: int) -> tuple[np.ndarray, ...]:
    """Per neighbourhood code, the marching-squares segment vectors (2D) or marching-cubes
    triangle area vectors (3D) in unit-voxel coordinates.

    Iso-vertices at edge midpoints; a configuration and its complement share one surface
    (the one with at most half the corners inside); on an ambiguous face the inside corners
    are cut off separately; polygons are fan-triangulated from the vertex giving the fewest
    planes. This reproduces DeepMind surface-distance's lookup tables exactly (tested).
    """
    corners = list(itertools.product((0, 1), repeat=ndim))
    out = []
    for code in range(2 ** len(corners)):
        inside = {c for c in corners if code & _corner_weight(c)}
        if 2 * len(inside) > len(corners):
            inside = set(corners) - inside
        segs = []
        for face in _faces(ndim):
            edges = [tuple(sorted((face[i], face[(i + 1) % 4]))) for i in range(4)]
            cut = [(face[i] in inside) != (face[(i + 1) % 4] in inside) for i in range(4)]
            if sum(cut) == 2:
                segs.append(tuple(e for e, c in zip(edges, cut, strict=True) if c))
            elif sum(cut) == 4:
                k = next(i for i in range(4) if face[i] in inside)  # cut corner k off
                segs += [(edges[k - 1], edges[k]), (edges[(k + 1) % 4], edges[(k + 2) % 4])]

        def mid(e):
            return np.mean(np.asarray(e, dtype=np.float64), axis=0)

        if ndim == 2:
            vecs = [mid(b) - mid(a) for a, b in segs]
        else:
            vecs = []
            while segs:  # chain face segments into closed polygons
                a, b = segs.pop(0)
                chain = [a, b]
                while True:
                    nxt = next(((i, s) for i, s in enumerate(segs) if chain[-1] in s), None)
                    if nxt is None:
                        break
                    i, s = nxt
                    segs.pop(i)
                    e = s[1] if s[0] == chain[-1] else s[0]
                    if e == chain[0]:
                        break
                    chain.append(e)
                vecs += _fan([mid(e) for e in chain])
        out.append(np.asarray(vecs, dtype=np.float64).reshape(-1, ndim))
    return tuple(out)


@functools.lru_cache(maxsize=32)
def _surfel_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Contour length (2D, mm) or surface area (3D, mm²) of each neighbourhood code."""
    sp = np.asarray(spacing, dtype=np.float64)
    scale = sp if sp.size == 2 else np.prod(sp) / sp  # segments scale by s, areas by cofactors
    return np.array([np.linalg.norm(v * scale, axis=1).sum() for v in _measure_vectors(sp.size)])


def _codes(mask: np.ndarray) -> np.ndarray:
    """Neighbourhood code of every voxel corner: shape ``S + 1`` of a mask zero-padded by 1."""
    m = np.pad(mask.astype(np.uint8), 1)
    code = np.zeros(tuple(s - 1 for s in m.shape), dtype=np.uint8)
    for c in itertools.product((0, 1), repeat=mask.ndim):
        sl = tuple(slice(o, o + n) for o, n in zip(c, code.shape, strict=True))
        code |= m[sl] * np.uint8(_corner_weight(c))
    return code


def surface_distances(
    mask_a: ArrayLike, mask_b: ArrayLike, spacing: Sequence[float]
) -> dict[str, np.ndarray]:
    """Distances (mm) between the surfaces of two binary masks, as DeepMind's
    ``surface_distance.compute_surface_distances`` (used by the Learn2Reg evaluation).

    Surface elements live on the voxel-corner grid: a corner is on the surface when its
    2^D neighbourhood of voxels holds both inside and outside (outside the array is
    background). Each carries the length / area of the marching-squares / -cubes surface
    through its neighbourhood, in mm. Distances come from Euclidean distance transforms of
    the other mask's surface with ``sampling=spacing``; with one mask empty, the other's
    distances are ``inf``. Returns ``distances_a_to_b``, ``areas_a``, ``distances_b_to_a``,
    ``areas_b`` (unsorted).
    """
    sp = tuple(float(s) for s in spacing)
    a = _np(mask_a).astype(bool)
    b = _np(mask_b).astype(bool)
    if a.shape != b.shape or a.ndim != len(sp) or a.ndim not in (2, 3):
        raise ValueError(
            f"masks {a.shape}, {b.shape} must share one 2D/3D shape matching spacing {sp}"
        )
    empty = {k: np.zeros(0) for k in ("distances_a_to_b", "areas_a", "distances_b_to_a", "areas_b")}
    union = a | b
    if not union.any():
        return empty
    box = ndimage.find_objects(union.astype(np.uint8))[0]
    a, b = a[box], b[box]
    table = _surfel_table(sp)
    full = 2 ** (2**a.ndim) - 1
    codes = [_codes(a), _codes(b)]
    borders = [(c != 0) & (c != full) for c in codes]
    dmaps = [
        ndimage.distance_transform_edt(~br, sampling=sp) if br.any() else np.full(br.shape, np.inf)
        for br in borders
    ]
    return {
        "distances_a_to_b": dmaps[1][borders[0]],
        "areas_a": table[codes[0][borders[0]]],
        "distances_b_to_a": dmaps[0][borders[1]],
        "areas_b": table[codes[1][borders[1]]],
    }


def _directed_percentile(d: np.ndarray, w: np.ndarray, percent: float) -> float:
    if d.size == 0:
        return float("inf")
    order = np.lexsort((w, d))  # sort by distance, then area, as surface-distance
    d, w = d[order], w[order]
    cum = np.cumsum(w) / np.sum(w)
    return float(d[min(int(np.searchsorted(cum, percent / 100.0)), d.size - 1)])


def robust_hausdorff(surface: dict[str, np.ndarray], percent: float = 95.0) -> float:
    """``max`` of the two directed, area-weighted ``percent``-th percentile surface distances
    (surface-distance's ``compute_robust_hausdorff``): for each direction the smallest
    sorted distance whose cumulative area fraction reaches ``percent/100``."""
    return max(
        _directed_percentile(surface["distances_a_to_b"], surface["areas_a"], percent),
        _directed_percentile(surface["distances_b_to_a"], surface["areas_b"], percent),
    )


def hausdorff_distance(
    fixed_labels: ArrayLike,
    warped_labels: ArrayLike,
    spacing: Sequence[float],
    labels: Sequence[int] | None = None,
    percent: float = 95.0,
) -> dict[int, float]:
    """Robust Hausdorff distance (mm) per label; see :func:`hd95`. ``percent=100`` is the
    classical (maximum) Hausdorff distance between the two surfaces."""
    f, w = _pair(fixed_labels, warped_labels, len(spacing))
    out = {}
    for lbl in _label_list(f, labels):
        fa, wa = f == lbl, w == lbl
        if not fa.any() and not wa.any():
            out[lbl] = float("nan")
        else:
            out[lbl] = robust_hausdorff(surface_distances(fa, wa, spacing), percent)
    return out


def hd95(
    fixed_labels: ArrayLike,
    warped_labels: ArrayLike,
    spacing: Sequence[float],
    labels: Sequence[int] | None = None,
) -> dict[int, float]:
    """95th-percentile Hausdorff distance (mm) per label, as in the Learn2Reg evaluation:
    ``compute_robust_hausdorff(compute_surface_distances(fixed == l, warped == l, spacing),
    95)`` of DeepMind's surface-distance, reimplemented with scipy (identical numbers).

    That is the maximum of the two *directed* area-weighted 95th percentiles (not a
    percentile of the pooled distances). Labels default to the nonzero labels of the fixed
    map. A label absent from both maps gives NaN; absent from exactly one gives ``inf``
    (surface-distance's value; Learn2Reg itself reports NaN when the label is missing from
    the fixed or the *unwarped* moving map, which this function cannot see). Note that
    Learn2Reg passes unit spacing; pass the real spacing for mm.
    """
    return hausdorff_distance(fixed_labels, warped_labels, spacing, labels, 95.0)


# ---------------------------------------------------------------------------- landmarks
def tre(
    fixed_points: ArrayLike,
    moving_points: ArrayLike,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[np.ndarray, float]:
    """Target registration error ``||T(p_fixed) - p_moving||`` in mm.

    Points are ``(P, D)`` world coordinates (RAS mm); ``transform`` maps fixed to moving
    world points (a :class:`~learnreg.spatial.SpatialTransform` or any callable on
    ``(1, P, D)``); ``None`` is the identity (the error before registration).
    Returns the per-point errors and their mean.
    """
    pf = torch.as_tensor(_np(fixed_points), dtype=torch.float64)
    pm = torch.as_tensor(_np(moving_points), dtype=torch.float64)
    if pf.dim() != 2 or pf.shape != pm.shape:
        raise ValueError(
            f"tre: point sets must both be (P, D); got {tuple(pf.shape)}, {tuple(pm.shape)}"
        )
    with torch.no_grad():
        mapped = pf if transform is None else transform(pf.unsqueeze(0))[0].to(torch.float64)
    err = torch.linalg.norm(mapped - pm, dim=-1).cpu().numpy()
    return err, float(err.mean()) if err.size else float("nan")


# ---------------------------------------------------------------------------- Jacobians
def _field(displacement: ArrayLike) -> torch.Tensor:
    u = torch.as_tensor(_np(displacement), dtype=torch.float64)
    if u.dim() in (3, 4) and u.shape[0] == u.dim() - 1:
        u = u.unsqueeze(0)
    if u.dim() not in (4, 5) or u.shape[:2] != (1, u.dim() - 2):
        raise ValueError(f"displacement must be (1, D, *S) or (D, *S); got {tuple(u.shape)}")
    return u


def _mask(mask: ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = _np(mask).astype(bool)
    while m.ndim > len(shape) and m.shape[0] == 1:
        m = m[0]
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} != field shape {shape}")
    return m


def jacobian_stats(
    displacement: ArrayLike,
    mask: ArrayLike | None = None,
    spacing: Sequence[float] | None = None,
) -> dict[str, float]:
    """Statistics of the Jacobian determinant of ``x ↦ x + u(x)``.

    ``displacement`` is ``(1, D, *S)`` or ``(D, *S)`` in voxel units (or mm along index
    axes when ``spacing`` is given); determinants from
    :func:`learnreg.spatial.differential.jacobian_determinant` (central differences). Over
    the voxels of ``mask`` (default all):

    - ``folding_count`` / ``folding_fraction``: voxels with det J ≤ 0 on the *raw*
      determinant (the Learn2Reg script counts ``jac_det <= 0`` on its shifted, clipped
      value, which is never ≤ 0);
    - ``sdlogj``: ``std(log(clip(det J, 1e-9, 1e9)))`` (population std): the standard
      deviation of the log-Jacobian with folds clipped to a finite value;
    - ``sdlogj_l2r``: the Learn2Reg leaderboard number, ``std(log(clip(det J + 3, 1e-9,
      1e9)))`` on the interior ``[2:-2]`` of every axis. Learn2Reg shifts by 3 so that folds
      stay finite; for det J ≈ 1 it is about a quarter of ``sdlogj``, so only compare it
      with Learn2Reg's tables;
    - ``min``, ``max``, ``mean`` of det J.
    """
    u = _field(displacement)
    det = jacobian_determinant(u, spacing)[0].numpy()
    m = _mask(mask, det.shape)
    vals = det[m]
    if vals.size == 0:
        raise ValueError("jacobian_stats: the mask selects no voxels")
    folds = int((vals <= 0).sum())
    inner = (slice(2, -2),) * det.ndim
    shifted = np.log(np.clip(det[inner] + 3.0, 1e-9, 1e9))[m[inner]]
    return {
        "folding_fraction": folds / vals.size,
        "folding_count": folds,
        "sdlogj": float(np.log(np.clip(vals, 1e-9, 1e9)).std()),
        "sdlogj_l2r": float(shifted.std()) if shifted.size else float("nan"),
        "min": float(vals.min()),
        "max": float(vals.max()),
        "mean": float(vals.mean()),
    }


def inverse_consistency_error(
    forward_disp: ArrayLike,
    backward_disp: ArrayLike,
    spacing: Sequence[float] | None = None,
    mask: ArrayLike | None = None,
) -> dict[str, float]:
    """Inverse-consistency error ``||u_f(x) + u_b(x + u_f(x))||`` in mm.

    Both fields are ``(1, D, *S)`` (or ``(D, *S)``) in voxel units of one grid with voxel
    size ``spacing`` (direction cosines do not change lengths): ``u_f`` fixed→moving, ``u_b``
    moving→fixed. ``u_b`` is sampled at ``x + u_f(x)`` with :func:`learnreg.spatial.warp`
    (linear, border padding). Returns ``mean``, ``max`` and ``p95`` over ``mask`` (default
    all voxels).
    """
    uf, ub = _field(forward_disp), _field(backward_disp)
    if uf.shape != ub.shape:
        raise ValueError(f"field shapes differ: {tuple(uf.shape)} vs {tuple(ub.shape)}")
    d = uf.shape[1]
    sp = torch.ones(d, dtype=torch.float64) if spacing is None else torch.tensor(spacing)
    if sp.numel() != d:
        raise ValueError(f"spacing {list(spacing or [])} must have {d} entries")
    resid = uf + warp(ub, uf, mode="linear", padding="border")
    err = torch.linalg.norm(resid[0] * sp.to(resid).view(d, *([1] * d)), dim=0).numpy()
    e = err[_mask(mask, err.shape)]
    return {"mean": float(e.mean()), "max": float(e.max()), "p95": float(np.percentile(e, 95))}
