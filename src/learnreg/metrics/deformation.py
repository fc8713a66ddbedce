"""Properties of a deformation: Jacobian statistics (folding, SDlogJ), inverse consistency."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from learnreg.metrics._arrays import ArrayLike, _field, _mask
from learnreg.spatial.differential import jacobian_determinant
from learnreg.spatial.sampling import warp

__all__ = ["jacobian_stats", "determinant_stats", "inverse_consistency_error"]


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
    return determinant_stats(jacobian_determinant(u, spacing)[0], mask)


def determinant_stats(det: ArrayLike, mask: ArrayLike | None = None) -> dict[str, float]:
    """:func:`jacobian_stats` of an already computed determinant map ``(*S)``."""
    det = np.asarray(torch.as_tensor(det).detach().cpu().numpy(), dtype=np.float64)
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
