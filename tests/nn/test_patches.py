"""Patch-wise application: tiling covers the image, overlaps average, crops are slices."""

from __future__ import annotations

import pytest
import torch

from learnreg.nn.patches import apply_patchwise, crop_patches, patch_starts, random_corners


def test_starts_cover_the_image_with_the_last_patch_flush():
    assert patch_starts(40, 15, 14) == [0, 14, 25]
    assert patch_starts(15, 15, 14) == [0]
    assert patch_starts(43, 15, 14) == [0, 14, 28]
    with pytest.raises(ValueError):
        patch_starts(10, 15, 14)


@pytest.mark.parametrize("shape", [(40, 33), (12, 20, 17)])
def test_a_pointwise_network_is_reproduced_exactly(shape):
    """Overlapping outputs of a pointwise map agree, so their average is the map itself;
    images smaller than a patch are padded and cropped back."""
    torch.manual_seed(0)
    images = torch.rand(2, 2, *shape)

    def net(x):
        return torch.cat([x[:, :1] * 3 - x[:, 1:], x[:, 1:] ** 2], 1)

    out = apply_patchwise(net, images, 15, 14, 2, chunk=5)
    torch.testing.assert_close(out, net(images))


def test_overlaps_are_averaged():
    ones = torch.zeros(1, 1, 29)

    def position(x):  # each patch outputs its own index in the call
        position.calls += 1
        return torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1, 1).expand_as(x) + 1

    position.calls = 0
    out = apply_patchwise(position, ones, 15, 7, 1)  # patches at 0, 7, 14: values 1, 2, 3
    assert out[0, 0, 0] == 1 and out[0, 0, 7] == pytest.approx(1.5) and out[0, 0, 14] == 2
    assert out[0, 0, 28] == 3


def test_crops_and_random_corners_with_content():
    torch.manual_seed(1)
    images = torch.zeros(2, 1, 30, 40)
    images[:, :, 10:, 15:] = 1.0  # content in part of the image only
    corners = random_corners(images, 8, 5)
    assert corners.shape == (2, 5, 2)
    patches = crop_patches(images, corners, 8)
    assert patches.shape == (10, 1, 8, 8) and bool((patches.flatten(1).amax(1) > 0).all())
    i, j = corners[1, 2].tolist()
    torch.testing.assert_close(patches[7], images[1, :, i : i + 8, j : j + 8])
