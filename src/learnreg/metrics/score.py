"""One function scores a registration result: :func:`score_result`.

``learnreg register`` writes its numbers into ``metrics.json``, ``learnreg evaluate`` /
``learnreg benchmark`` record them per (method, pair), and training validation asks it for
Dice only (:meth:`learnreg.methods.base.RegistrationMethod.validate`), so a Dice or a fold
count means the same thing wherever it is printed.

Whatever produced the result, every number comes from the
:class:`~learnreg.spatial.result.RegistrationResult` (fixed→moving points, ``x_moving =
A(x + u(x))``): moving labels are warped label-safe (``mode="label"``) onto the fixed grid;
Dice and HD95 (mm, fixed spacing) are over the fixed map's nonzero labels; TRE maps the fixed
landmarks into moving space and compares them with the moving landmarks; Jacobian statistics
and inverse consistency use the deformable part on the fixed grid (an affine-only result has
no folds: its deformable part is the identity).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from learnreg.core.image import Image
from learnreg.core.options import check_option
from learnreg.metrics.deformation import determinant_stats, inverse_consistency_error
from learnreg.metrics.landmarks import tre
from learnreg.metrics.overlap import dice_per_label
from learnreg.metrics.surface import hd95 as hd95_per_label
from learnreg.spatial.result import RegistrationResult

__all__ = ["METRICS", "SCORE_KEYS", "score_result"]

METRICS: tuple[str, ...] = ("dice", "hd95", "tre", "jacobian", "ice", "seconds")
"""What :func:`score_result` can compute, in the order of its keys."""

SCORE_KEYS: dict[str, tuple[str, ...]] = {
    "dice": ("dice", "dice_mean"),
    "hd95": ("hd95", "hd95_mean"),
    "tre": ("tre_mean", "tre_max"),
    "jacobian": ("folding_fraction", "folding_count", "sdlogj", "jacobian"),
    "ice": ("ice_mean",),
    "seconds": ("seconds",),
}
"""The keys each metric fills in :func:`score_result`'s dict."""


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _label_image(labels: Image | torch.Tensor, grid, what: str) -> Image:
    if isinstance(labels, Image):
        return labels
    t = torch.as_tensor(labels)
    while t.dim() > grid.ndim + 1 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == grid.ndim:
        t = t[None]
    try:
        return Image(t, grid, what)
    except ValueError as e:
        raise ValueError(f"score_result: {e}") from None


@torch.no_grad()
def score_result(
    result: RegistrationResult,
    *,
    fixed_labels: Image | torch.Tensor | None = None,
    moving_labels: Image | torch.Tensor | None = None,
    fixed_points: torch.Tensor | np.ndarray | None = None,
    moving_points: torch.Tensor | np.ndarray | None = None,
    metrics: Sequence[str] = METRICS,
    warped_labels: Image | None = None,
) -> dict:
    """Score ``result``: a dict with the keys (:data:`SCORE_KEYS`) of every metric asked.

    Args:
        result: the registration (fixed grid, moving grid, affine, deformable part).
        fixed_labels, moving_labels: integer label maps on the fixed and moving grids
            (:class:`~learnreg.core.Image`, or tensors ``([1,] *S)`` on ``result``'s grids).
        fixed_points, moving_points: corresponding landmarks ``(P, D)``, world (RAS) mm.
        metrics: a subset of :data:`METRICS` (e.g. ``("dice",)`` for training validation).
        warped_labels: ``moving_labels`` already warped by ``result`` (``mode="label"``),
            when the caller has them (saves warping twice).

    Keys, ``None`` where the inputs a metric needs were not given:

    - ``dice``: ``{label (str): Dice}`` over the fixed map's nonzero labels (``None`` for a
      non-finite value); ``dice_mean`` their mean;
    - ``hd95``: ``{label: HD95 in mm}`` (fixed spacing), ``hd95_mean``;
    - ``tre_mean``, ``tre_max``: target registration error (mm);
    - ``folding_fraction``, ``folding_count``, ``sdlogj`` of the deformable part
      (:func:`~learnreg.metrics.determinant_stats` of the result's determinant map; 0 for an affine-only result) and
      ``jacobian``, the full statistics (``None`` for an affine-only result);
    - ``ice_mean``: mean inverse-consistency error (mm) of the deformable part and its
      inverse (``None`` without an inverse);
    - ``seconds``: ``result.info["seconds"]`` (the registration's own timing), if a number.
    """
    asked = [check_option("score_result metric", m, METRICS) for m in metrics]
    out: dict = {}
    for m in asked:
        out.update(dict.fromkeys(SCORE_KEYS[m]))
    grid = result.fixed_grid

    if ("dice" in asked or "hd95" in asked) and fixed_labels is not None:
        if moving_labels is None and warped_labels is None:
            raise ValueError("score_result: fixed_labels given without moving_labels")
        f_img = _label_image(fixed_labels, grid, "fixed labels")
        if warped_labels is None:
            m_img = _label_image(moving_labels, result.moving_grid, "moving labels")
            warped_labels = result.warp(m_img, mode="label")
        f_lab, w_lab = f_img.data[0], warped_labels.data[0]
        dice = dice_per_label(f_lab, w_lab)
        if "dice" in asked:
            out["dice"] = {str(k): _finite(v) for k, v in dice.items()}
            out["dice_mean"] = _mean(out["dice"].values())
        if "hd95" in asked:
            hd = hd95_per_label(f_lab, w_lab, grid.spacing, labels=sorted(dice))
            out["hd95"] = {str(k): _finite(v) for k, v in hd.items()}
            out["hd95_mean"] = _mean(out["hd95"].values())

    if "tre" in asked and fixed_points is not None and moving_points is not None:
        err, _ = tre(fixed_points, moving_points, result.transform())
        out["tre_mean"], out["tre_max"] = float(err.mean()), float(err.max())

    if "jacobian" in asked or "ice" in asked:
        u = None if result.deformable is None else result.deformable.voxel_field().detach()
        if "jacobian" in asked:
            if u is None:  # affine only: the deformable part is the identity
                out["folding_fraction"], out["folding_count"], out["sdlogj"] = 0.0, 0, 0.0
            else:
                js = determinant_stats(result.jacobian_determinant())
                out["jacobian"] = js
                out["folding_fraction"] = js["folding_fraction"]
                out["folding_count"] = js["folding_count"]
                out["sdlogj"] = js["sdlogj"]
        if "ice" in asked and u is not None and result.inverse_deformable is not None:
            w = result.inverse_deformable.voxel_field().detach()
            out["ice_mean"] = inverse_consistency_error(u, w, grid.spacing)["mean"]

    if "seconds" in asked:
        s = result.info.get("seconds")
        out["seconds"] = (
            float(s) if isinstance(s, int | float) and not isinstance(s, bool) else None
        )
    return out
