"""Adversarial loss terms on discriminator logits.

``kind="bce"``: the original GAN's cross-entropy, with the non-saturating generator loss
``−log D(fake)`` (Goodfellow 2014; the form Fan, Hu and Mahapatra train with); ``kind="lsgan"``:
least squares (Mao 2017), ``(D(real) − 1)² + D(fake)²`` for the discriminator and
``(D(fake) − 1)²`` for the generator, on raw logits. Logits of any shape (per image or per
patch) are averaged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from learnreg.core.options import check_option

__all__ = ["ADVERSARIAL_KINDS", "discriminator_loss", "generator_loss"]

ADVERSARIAL_KINDS = ("bce", "lsgan")


def discriminator_loss(real: Tensor, fake: Tensor, kind: str = "bce") -> Tensor:
    """The discriminator's loss: ``real`` logits should say real (1), ``fake`` say fake (0).

    For ``bce`` it is the mean of both cross-entropies, ``log 2 ≈ 0.693`` for a discriminator
    that cannot tell them apart (logits 0)."""
    check_option("adversarial kind", kind, ADVERSARIAL_KINDS)
    if kind == "bce":
        real_term = F.binary_cross_entropy_with_logits(real, real.new_ones(()).expand_as(real))
        fake_term = F.binary_cross_entropy_with_logits(fake, fake.new_zeros(()).expand_as(fake))
    else:
        real_term, fake_term = (real - 1).square().mean(), fake.square().mean()
    return 0.5 * (real_term + fake_term)


def generator_loss(fake: Tensor, kind: str = "bce") -> Tensor:
    """The generator's adversarial term: its outputs' logits ``fake`` should say real."""
    check_option("adversarial kind", kind, ADVERSARIAL_KINDS)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake, fake.new_ones(()).expand_as(fake))
    return (fake - 1).square().mean()
