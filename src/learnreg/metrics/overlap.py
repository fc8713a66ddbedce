"""Label overlap: Dice per label and its mean."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from learnreg.metrics._arrays import ArrayLike, _label_list, _pair

__all__ = ["dice_per_label", "mean_dice"]


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
