"""Adversarial terms against their formulas (stable log-sigmoid and least squares)."""

from __future__ import annotations

import pytest
import torch

from learnreg.losses.adversarial import discriminator_loss, generator_loss


def test_bce_terms_match_the_cross_entropy_formula() -> None:
    torch.manual_seed(0)
    real, fake = torch.randn(5), torch.randn(5, 1, 3, 3)
    sig = torch.sigmoid
    want_d = 0.5 * (-sig(real).log().mean() - (1 - sig(fake)).log().mean())
    torch.testing.assert_close(discriminator_loss(real, fake), want_d)
    torch.testing.assert_close(generator_loss(fake), -sig(fake).log().mean())
    # a discriminator that cannot tell (logits 0) scores log 2; huge logits stay finite
    assert float(discriminator_loss(torch.zeros(3), torch.zeros(3))) == pytest.approx(0.6931, 1e-4)
    assert torch.isfinite(generator_loss(torch.tensor([-1e4])))


def test_lsgan_terms() -> None:
    real, fake = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 2.0])
    assert float(discriminator_loss(real, fake, "lsgan")) == pytest.approx(0.5 * (0.125 + 2.0))
    assert float(generator_loss(fake, "lsgan")) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="adversarial kind"):
        generator_loss(fake, "wgan")
