"""Independent numpy/scipy references and smooth test fields for the spatial tests."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates


def identity(shape: tuple[int, ...]) -> np.ndarray:
    """Index coordinates ``(D, *S)``."""
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))


def sample_linear(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``field (C, *S)`` at index ``points (D, *T)``, border extended."""
    return np.stack([map_coordinates(f, points, order=1, mode="nearest") for f in field])


def compose(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``w(x) = v(x) + u(x + v(x))`` for voxel-unit fields ``(D, *S)``."""
    return v + sample_linear(u, identity(u.shape[1:]) + v)


def smooth_field(shape: tuple[int, ...], amplitude: float, seed: int = 0) -> np.ndarray:
    """A smooth displacement ``(D, *S)``: a few Gaussian bumps, max ``|u|`` about ``amplitude``."""
    rng = np.random.default_rng(seed)
    x = identity(shape)
    sigma = 0.18 * min(shape)
    out = np.zeros((len(shape), *shape))
    for _ in range(3):
        centre = rng.uniform(0.3, 0.7, len(shape)) * (np.asarray(shape) - 1)
        r2 = sum((x[a] - centre[a]) ** 2 for a in range(len(shape)))
        out += rng.uniform(-1, 1, (len(shape),) + (1,) * len(shape)) * np.exp(-r2 / (2 * sigma**2))
    return out * amplitude / np.abs(out).max()
