"""Array helpers shared by the metrics: numpy views of tensors, label maps, masks, fields."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


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
