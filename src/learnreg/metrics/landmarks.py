"""Landmark errors: target registration error (TRE) in mm."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from learnreg.metrics._arrays import ArrayLike, _np

__all__ = ["tre"]


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
