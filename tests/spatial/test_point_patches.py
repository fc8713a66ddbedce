"""Multi-scale intensity patches at points."""

from __future__ import annotations

import pytest
import torch

from learnreg.spatial.filters import gaussian_blur
from learnreg.spatial.point_patches import patch_features, patch_offsets


@pytest.mark.parametrize("ndim", [2, 3])
def test_patch_features_sample_the_smoothed_image_around_each_point(ndim) -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, *(12,) * ndim, generator=g)
    points = torch.randint(0, 12, (4, 3, ndim), generator=g)
    f = patch_features(image, points, 3, (1, 2))
    assert f.shape == (4, 3, 2 * 3**ndim)
    offsets = patch_offsets(ndim, 3)
    smooth = gaussian_blur(image[None], 1.0)[0, 0]
    for k in range(4):
        for c in range(3):
            for j, o in enumerate(offsets):
                for s, (src, base) in enumerate(((image[0], 0), (smooth, 3**ndim))):
                    q = points[k, c] + (s + 1) * o
                    inside = bool(((q >= 0) & (q < 12)).all())
                    want = float(src[tuple(q.tolist())]) if inside else 0.0
                    assert float(f[k, c, base + j]) == pytest.approx(want, abs=1e-6)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="odd"):
        patch_offsets(2, 4)
    with pytest.raises(ValueError, match="integer"):
        patch_features(torch.rand(1, 8, 8), torch.rand(3, 2), 3, (1,))
