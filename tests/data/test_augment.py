"""Random augmentation: reproducible, label-safe, image and labels stay aligned."""

from __future__ import annotations

import pytest
import torch

from learnreg.data.augment import AugmentConfig, Augmenter, random_displacement


def _blob(shape):
    pts = torch.stack(torch.meshgrid(*[torch.arange(s).float() for s in shape], indexing="ij"))
    c = torch.tensor([s / 2 for s in shape]).view(-1, *[1] * len(shape))
    r = ((pts - c) ** 2).sum(0).sqrt()
    lab = (r < shape[0] / 4).long() * 7 + ((r >= shape[0] / 4) & (r < shape[0] / 3)).long() * 3
    img = torch.where(lab == 7, 0.9, torch.where(lab == 3, 0.5, 0.05))
    return img[None], lab[None]


@pytest.mark.parametrize("shape", [(40, 48), (20, 24, 20)])
def test_augment_keeps_labels_aligned(shape):
    img, lab = _blob(shape)
    cfg = AugmentConfig(rotation=15, scale=0.1, translation=3, elastic=1.5, elastic_sigma=3)
    aug = Augmenter(cfg)
    out_img, out_lab = aug.augment_image(img, lab, torch.Generator().manual_seed(1))
    assert out_lab.dtype == torch.int64
    assert set(out_lab.unique().tolist()) <= {0, 3, 7}  # label-valued, no blends
    assert not torch.equal(out_lab, lab)
    # aligned: the image is 0.9 inside label 7, 0.5 inside label 3 (away from edges)
    assert (out_img[out_lab == 7] - 0.9).abs().median() < 0.05
    assert (out_img[out_lab == 3] - 0.5).abs().median() < 0.1  # a thin ring: mostly edges
    agree = ((out_img > 0.7) == (out_lab == 7)).float().mean()
    assert agree > 0.97


def test_augment_reproducible_and_intensity():
    img, lab = _blob((32, 32))
    cfg = AugmentConfig(rotation=10, elastic=1.0, gamma=0.3, contrast=0.2, noise=0.05)
    aug = Augmenter(cfg)
    item = {"fixed": img, "moving": img, "fixed_labels": lab, "moving_labels": lab}
    a = aug(item, torch.Generator().manual_seed(5))
    b = aug(item, torch.Generator().manual_seed(5))
    c = aug(item, torch.Generator().manual_seed(6))
    assert torch.equal(a["moving"], b["moving"]) and torch.equal(
        a["fixed_labels"], b["fixed_labels"]
    )
    assert not torch.equal(a["moving"], c["moving"])
    assert not torch.equal(a["fixed"], a["moving"])  # fixed and moving drawn independently
    assert 0 <= float(a["moving"].min()) and float(a["moving"].max()) <= 1


def test_config_validation_and_identity():
    with pytest.raises(ValueError, match="rotation"):
        AugmentConfig(rotation=-1)
    assert not AugmentConfig().enabled
    u = random_displacement((8, 9), AugmentConfig(), torch.Generator().manual_seed(0))
    assert u.shape == (1, 2, 8, 9) and float(u.abs().max()) < 1e-5
