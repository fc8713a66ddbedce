"""Quality-control figures of a registration (matplotlib, Agg, no pyplot state).

Arrays are in index order ``(i, j[, k])`` on the fixed grid. 3D: pass the fixed ``grid`` so
that slices are reoriented to the closest RAS axes (right, anterior, superior shown right, up,
up); without it the index axes are assumed to point R, A, S already. 2D images are shown as
image viewers show them: index ``i`` (columns) to the right, ``j`` (rows) downwards, row 0 at
the top.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from scipy import ndimage

from learnreg.core.files import atomic_write
from learnreg.core.grid import Grid
from learnreg.spatial.differential import jacobian_determinant

__all__ = ["qc_figure", "checkerboard", "deformation_grid_lines", "save_figure"]

_AXIS_NAMES = ("R", "A", "S")
# view name, axis held fixed, (horizontal, vertical) axes after reorientation to RAS
_VIEWS_3D = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))
_FOLD_CMAP = ListedColormap(["black"])


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _squeeze(x, ndim: int | None = None, vector: bool = False) -> np.ndarray:
    """Float array with leading singleton (batch / channel) axes dropped."""
    a = _np(x).astype(np.float64, copy=False)
    target = 2 if ndim is None else ndim + int(vector)
    while a.ndim > target and a.shape[0] == 1:
        a = a[0]
    if ndim is not None and a.ndim != target:
        kind = "a vector field" if vector else "an image"
        raise ValueError(f"expected {kind} of a {ndim}D grid, got shape {a.shape}")
    return a


# ---------------------------------------------------------------------------- helpers
def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate tiles of ``a`` and ``b`` (same shape, any dimension), ``tiles`` per axis."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"checkerboard: shapes differ, {a.shape} vs {b.shape}")
    idx = np.indices(a.shape)
    parity = sum((idx[d] * tiles // max(n, 1)) for d, n in enumerate(a.shape)) % 2
    return np.where(parity == 0, a, b)


def deformation_grid_lines(displacement_2d: np.ndarray, step: int) -> list[np.ndarray]:
    """Polylines of a regular grid moved by a 2D displacement ``(2, P, Q)`` (voxel units).

    Grid lines lie every ``step`` voxels; each returned ``(n, 2)`` array holds the points
    ``x + u(x)`` along one line, as (p, q) coordinates: the deformation ``x ↦ x + u(x)``.
    """
    u = np.asarray(displacement_2d, dtype=np.float64)
    if u.ndim != 3 or u.shape[0] != 2:
        raise ValueError(f"displacement_2d must be (2, P, Q), got {u.shape}")
    step = max(1, int(step))
    p, q = np.meshgrid(np.arange(u.shape[1]), np.arange(u.shape[2]), indexing="ij")
    xp, xq = p + u[0], q + u[1]
    lines = [np.stack([xp[i], xq[i]], axis=-1) for i in range(0, u.shape[1], step)]
    lines += [np.stack([xp[:, j], xq[:, j]], axis=-1) for j in range(0, u.shape[2], step)]
    return lines


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` atomically (see :func:`learnreg.core.files.atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix[1:].lower() or "png"
    with atomic_write(path) as tmp:
        FigureCanvasAgg(fig)
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path


def _orientation(grid: Grid | None, ndim: int) -> tuple[list[int], list[bool], list[float]]:
    """Index axis shown as world axis r, whether it is flipped, and its spacing."""
    if grid is None:
        return list(range(ndim)), [False] * ndim, [1.0] * ndim
    if grid.ndim != ndim:
        raise ValueError(f"grid is {grid.ndim}D but the images are {ndim}D")
    m = np.abs(np.asarray(grid.direction))
    perm: list[int] = []
    for r in range(ndim):  # greedy: each world axis takes its closest unused index axis
        order = [int(a) for a in np.argsort(-m[r]) if int(a) not in perm]
        perm.append(order[0])
    d = np.asarray(grid.direction)
    flips = [bool(d[r, perm[r]] < 0) for r in range(ndim)]
    return perm, flips, [grid.spacing[a] for a in perm]


def _reorient(a: np.ndarray, perm: list[int], flips: list[bool], vector: bool = False):
    if vector:  # components follow the axes, and change sign where an axis is flipped
        a = np.stack([(-1 if f else 1) * a[p] for p, f in zip(perm, flips, strict=True)])
        a = np.transpose(a, [0] + [p + 1 for p in perm])
        off = 1
    else:
        a = np.transpose(a, perm)
        off = 0
    for r, f in enumerate(flips):
        if f:
            a = np.flip(a, axis=r + off)
    return np.ascontiguousarray(a)


def _edges(a: np.ndarray, fraction: float = 0.12) -> np.ndarray:
    """The strongest ``fraction`` of gradient magnitudes (Sobel) of a 2D slice."""
    g = np.hypot(ndimage.sobel(a, axis=0), ndimage.sobel(a, axis=1))
    positive = g[g > 0]
    if positive.size == 0:
        return np.zeros(a.shape, dtype=bool)
    return g >= np.quantile(positive, 1.0 - fraction)


def _wrapped(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``width_inches`` at ``fontsize`` points."""
    chars = max(20, int(width_inches * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars)) or text


def _robust_range(a: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(a, [0.5, 99.5])
    return (float(lo), float(hi)) if hi > lo else (float(a.min()), float(a.max()) + 1e-6)


def _label_edges(lab: np.ndarray) -> np.ndarray:
    """Pixels of a 2D label slice that differ from a 4-neighbour (not background pairs)."""
    e = np.zeros(lab.shape, dtype=bool)
    for ax in (0, 1):
        d = np.diff(lab, axis=ax) != 0
        sl_a = [slice(None)] * 2
        sl_b = [slice(None)] * 2
        sl_a[ax], sl_b[ax] = slice(1, None), slice(None, -1)
        e[tuple(sl_a)] |= d & (lab[tuple(sl_a)] != 0)
        e[tuple(sl_b)] |= d & (lab[tuple(sl_b)] != 0)
    return e


@dataclass
class _View:
    name: str
    axes: tuple[int, int]  # (horizontal, vertical) array axes of the oriented volume
    index: tuple  # slicing of the oriented volume
    spacing: tuple[float, float]


# ---------------------------------------------------------------------------- figure
def qc_figure(
    fixed,
    moving,
    warped,
    path: str | os.PathLike,
    displacement=None,
    jacobian=None,
    labels=None,
    title: str | None = None,
    *,
    grid: Grid | None = None,
    slices: Sequence[int] | None = None,
    grid_step: int | None = None,
    tiles: int = 8,
    dpi: int = 120,
    multimodal: bool = False,
) -> Path:
    """Write a QC figure of one registration to ``path`` (atomically) and return the path.

    Args:
        fixed, moving, warped: images on the fixed grid (2D or 3D arrays or tensors, leading
            singleton axes allowed); ``moving`` is the moving image resampled to the fixed
            grid *before* the deformation, ``warped`` after.
        displacement: optional ``(D, *S)`` displacement in voxel units of the fixed grid;
            draws the deformed grid and, when ``jacobian`` is not given, its determinant.
        jacobian: optional determinant map ``(*S)``; diverging colours centred at 1, folds
            (det ≤ 0) in black, ringed, and counted in the row title.
        labels: optional fixed label map, or a pair ``(fixed_labels, warped_labels)``;
            label boundaries are drawn on the fixed (and warped) rows.
        grid: the fixed grid, for orientation and voxel aspect (default: RAS, 1 mm).
        slices: index ``(i, j, k)`` of the displayed slices (3D; default central).
        grid_step: deformation-grid spacing in voxels (default about 1/24 of the extent).
        multimodal: the images' intensities are not comparable (MR vs US, T1 vs T2): the
            difference panel becomes the fixed image's edges over the warped moving image.

    3D: one row per panel (fixed, moving, warped, checkerboard, |fixed - warped| (each normalized), grid,
    det J), columns axial / coronal / sagittal. 2D: the same panels, four per row.
    """
    f = _squeeze(fixed)
    nd = f.ndim
    if nd not in (2, 3):
        raise ValueError(f"qc_figure needs 2D or 3D images, got shape {f.shape}")
    imgs = {"fixed": f, "moving": _squeeze(moving, nd), "warped": _squeeze(warped, nd)}
    for k, v in imgs.items():
        if v.shape != f.shape:
            raise ValueError(f"{k} image shape {v.shape} != fixed shape {f.shape}")
    if nd == 2:  # as image viewers: index axes as stored, row 0 at the top
        perm, flips = [0, 1], [False, False]
        spacing = list(grid.spacing) if grid is not None else [1.0, 1.0]
    else:
        perm, flips, spacing = _orientation(grid, nd)
    imgs = {k: _reorient(v, perm, flips) for k, v in imgs.items()}
    disp = None
    if displacement is not None:
        disp = _squeeze(displacement, nd, vector=True)
        if disp.shape != (nd, *f.shape):
            raise ValueError(f"displacement {disp.shape} must be ({nd}, *{f.shape})")
        if jacobian is None:
            jacobian = jacobian_determinant(torch.from_numpy(disp)[None])[0].numpy()
        disp = _reorient(disp, perm, flips, vector=True)
    jac = None if jacobian is None else _reorient(_squeeze(jacobian, nd), perm, flips)
    lab_f = lab_w = None
    if labels is not None:
        pair = labels if isinstance(labels, (tuple, list)) else (labels, None)
        lab_f = _reorient(_squeeze(pair[0], nd), perm, flips)
        lab_w = None if pair[1] is None else _reorient(_squeeze(pair[1], nd), perm, flips)

    shape = imgs["fixed"].shape
    if nd == 3:
        centre = [s // 2 for s in shape]
        if slices is not None:  # given in original index order
            for r, (p, fl) in enumerate(zip(perm, flips, strict=True)):
                centre[r] = shape[r] - 1 - int(slices[p]) if fl else int(slices[p])
        views = []
        for name, ax, (h, v) in _VIEWS_3D:
            idx = [slice(None)] * 3
            idx[ax] = int(np.clip(centre[ax], 0, shape[ax] - 1))
            label = f"{name} ({'ijk'[perm[ax]]}={slices[perm[ax]] if slices else idx[ax]})"
            views.append(_View(label, (h, v), tuple(idx), (spacing[h], spacing[v])))
    else:
        views = [_View("", (0, 1), (slice(None), slice(None)), (spacing[0], spacing[1]))]

    step = grid_step or max(2, int(round(max(shape) / 24)))
    ranges = {k: _robust_range(v) for k, v in imgs.items()}
    norm01 = {
        k: np.clip((v - ranges[k][0]) / (ranges[k][1] - ranges[k][0]), 0, 1)
        for k, v in imgs.items()
    }
    # each image on its own robust [0, 1] scale, so different intensity scales do not show
    # up as misalignment
    diff = np.abs(norm01["fixed"] - norm01["warped"])
    dmax = float(np.percentile(diff, 99.5)) or float(diff.max()) or 1.0
    n_folds = None if jac is None else int((jac <= 0).sum())

    panels = [
        ("fixed", "fixed"),
        ("moving", "moving (on fixed grid, before warp)"),
        ("warped", "warped moving"),
        ("checker", f"checkerboard fixed / warped ({tiles}×{tiles})"),
        ("edges", "fixed edges (yellow) over warped moving")
        if multimodal
        else ("diff", "|fixed − warped| (each normalized to [0, 1])"),
    ]
    if disp is not None:
        panels.append(("grid", f"deformed grid (every {step} voxels)"))
    if jac is not None:
        pct = 100.0 * n_folds / jac.size
        panels.append(("jac", f"det J — folds (det ≤ 0, black): {n_folds} voxels, {pct:.3g}%"))

    def draw(ax: Axes, kind: str, view: _View):
        h, v = view.axes
        sl = view.index
        down = nd == 2  # a 2D image's rows go downwards, as in viewers
        extent = (-0.5, shape[h] - 0.5) + (
            (shape[v] - 0.5, -0.5) if down else (-0.5, shape[v] - 0.5)
        )
        aspect = view.spacing[1] / view.spacing[0]

        def show(a2d, **kw):  # a2d is (horizontal, vertical): h < v in every view
            return ax.imshow(
                a2d.T,
                origin="upper" if down else "lower",
                extent=extent,
                aspect=aspect,
                interpolation="nearest",
                **kw,
            )

        m = None
        if kind in ("fixed", "moving", "warped"):
            lo, hi = ranges[kind]
            m = show(imgs[kind][sl], cmap="gray", vmin=lo, vmax=hi)
            lab = lab_f if kind == "fixed" or lab_w is None else lab_w
            if lab is not None and kind != "moving":
                e = _label_edges(lab[sl])
                show(np.ma.masked_where(~e, e), cmap=ListedColormap(["#00e5ff"]), alpha=0.8)
        elif kind == "checker":
            m = show(
                checkerboard(norm01["fixed"][sl], norm01["warped"][sl], tiles),
                cmap="gray",
                vmin=0,
                vmax=1,
            )
        elif kind == "diff":
            m = show(diff[sl], cmap="magma", vmin=0, vmax=dmax)
        elif kind == "edges":
            m = show(norm01["warped"][sl], cmap="gray", vmin=0, vmax=1)
            e = _edges(norm01["fixed"][sl])
            show(np.ma.masked_where(~e, e), cmap=ListedColormap(["#ffd400"]), alpha=0.9)
        elif kind == "grid":
            show(norm01["fixed"][sl], cmap="gray", vmin=0, vmax=1, alpha=0.25)
            u2 = disp[(slice(None), *sl)][[h, v]]
            ax.add_collection(
                LineCollection(deformation_grid_lines(u2, step), colors="#1f3fbf", linewidths=0.6)
            )
            ax.set_xlim(extent[:2])
            ax.set_ylim(extent[2:])
        elif kind == "jac":
            j2 = jac[sl]
            m = show(j2, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0))
            folds = j2 <= 0
            if folds.any():
                show(np.ma.masked_where(~folds, folds), cmap=_FOLD_CMAP)
                comp, n = ndimage.label(folds)
                for c in ndimage.center_of_mass(folds, comp, range(1, n + 1)):
                    ax.plot(*c, "o", ms=14, mfc="none", mec="#00ff40", mew=1.8)
            ax.text(
                0.02,
                0.97,
                f"{int(folds.sum())} folded in slice",
                transform=ax.transAxes,
                va="top",
                fontsize=7,
                color="k",
                bbox={"fc": "w", "alpha": 0.7, "lw": 0},
            )
        for r, axis in ((h, ax.xaxis), (v, ax.yaxis)):
            name = "ijk"[perm[r]]
            if nd == 2:
                text = f"{name} (column) →" if r == 0 else f"{name} (row) ↓"
            else:
                text = f"{_AXIS_NAMES[r]} → ({name}, voxels)"
            axis.set_label_text(text, fontsize=7)
            if flips[r]:  # ticks show the original index along a flipped axis
                axis.set_major_formatter(FuncFormatter(lambda x, _, n=shape[r]: f"{n - 1 - x:g}"))
        ax.tick_params(labelsize=6)
        return m

    cb_labels = {"diff": "|Δ normalized intensity|", "jac": "det J", "checker": "normalized"}
    if nd == 3:
        widths = [shape[vw.axes[0]] * vw.spacing[0] for vw in views] + [0.06 * max(shape)]
        row_h = 2.7
        fig = Figure(
            figsize=(row_h * sum(widths) / max(shape), row_h * len(panels) + 0.5),
            layout="constrained",
        )
        for sf, (kind, label) in zip(
            np.atleast_1d(fig.subfigures(len(panels), 1)), panels, strict=True
        ):
            sf.suptitle(label, fontsize=9, fontweight="bold")
            gs = sf.add_gridspec(1, 4, width_ratios=widths)
            m = None
            for c, vw in enumerate(views):
                ax = sf.add_subplot(gs[0, c])
                m = draw(ax, kind, vw) or m
                ax.set_title(vw.name, fontsize=8)
            cax = sf.add_subplot(gs[0, 3])
            if m is not None:
                cb = sf.colorbar(m, cax=cax, extend="both" if kind == "jac" else "neither")
                cb.set_label(cb_labels.get(kind, "intensity"), fontsize=7)
                cb.ax.tick_params(labelsize=6)
            else:
                cax.axis("off")
    else:
        ncol = min(4, len(panels))
        nrow = -(-len(panels) // ncol)
        ratio = shape[1] * spacing[1] / (shape[0] * spacing[0])
        fig = Figure(figsize=(3.4 * ncol, 3.0 * ratio * nrow + 0.6), layout="constrained")
        for n, (kind, label) in enumerate(panels):
            ax = fig.add_subplot(nrow, ncol, n + 1)
            m = draw(ax, kind, views[0])
            ax.set_title(_wrapped(label, 2.6, 8), fontsize=8, fontweight="bold")
            if m is not None:
                cb = fig.colorbar(
                    m,
                    ax=ax,
                    fraction=0.046,
                    pad=0.02,
                    extend="both" if kind == "jac" else "neither",
                )
                cb.set_label(cb_labels.get(kind, "intensity"), fontsize=7)
                cb.ax.tick_params(labelsize=6)
    if title:  # wrapped to the figure's width: a long title is never clipped
        fig.suptitle(_wrapped(title, fig.get_figwidth() * 0.95, 11), fontsize=11)
    return save_figure(fig, path, dpi)
