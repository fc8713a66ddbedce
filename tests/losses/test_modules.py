"""Module wrappers and the name registry."""

from __future__ import annotations

import inspect

import pytest
import torch

import learnreg.losses as L


@pytest.mark.parametrize(
    "name,cls,options",
    [
        ("ncc", L.NCCLoss, {}),
        ("LNCC", L.LNCCLoss, {}),
        ("cc", L.LNCCLoss, {}),
        ("lcc", L.LNCCLoss, {}),
        ("mse", L.MSELoss, {}),
        ("ssd", L.MSELoss, {}),
        ("l1", L.L1Loss, {}),
        ("mae", L.L1Loss, {}),
        ("mi", L.MILoss, {}),
        ("nmi", L.MILoss, {"normalized": True}),
        ("ssim", L.SSIMLoss, {}),
        ("dice", L.DiceLoss, {}),
        ("msdice", L.MultiScaleDiceLoss, {}),
        ("diffusion", L.DiffusionRegularizer, {}),
        ("grad", L.DiffusionRegularizer, {}),
        ("bending", L.BendingEnergyRegularizer, {}),
        ("tv", L.TotalVariationRegularizer, {}),
        ("folding", L.FoldingRegularizer, {}),
        ("ic", L.InverseConsistencyLoss, {}),
        ("gpd", L.GridPointDistanceLoss, {}),
        ("epe", L.FieldL2Loss, {}),
    ],
)
def test_factory_names_and_aliases(name, cls, options):
    loss = L.create_loss(name)
    assert type(loss) is cls and loss.options == options


def test_modules_call_the_functional_with_their_options():
    f, m = torch.rand(2, 1, 12, 10), torch.rand(2, 1, 12, 10)
    loss = L.create_loss("cc", window=5, kernel="gaussian")
    assert loss(f, m).item() == L.lncc(f, m, window=5, kernel="gaussian").item()
    assert loss(f, m, reduction="none").shape == (2,)  # per-call override
    assert L.create_loss("nmi")(f, m).item() == L.mutual_information(f, m, normalized=True).item()
    u = torch.randn(1, 2, 8, 7)
    reg = L.DiffusionRegularizer(spacing=(2.0, 1.0))
    assert reg(u).item() == L.diffusion(u, (2.0, 1.0)).item()
    assert reg.kind == "regularizer" and loss.kind == "similarity"
    assert "window=5" in repr(loss)


def test_signatures_are_the_functional_options():
    params = inspect.signature(L.LNCCLoss).parameters
    assert list(params) == ["window", "kernel", "sigma", "mask", "eps", "reduction"]
    assert params["window"].default == 9


def test_helpful_errors():
    with pytest.raises(ValueError, match="did you mean 'lncc'.*valid names: .*bending"):
        L.create_loss("lnc")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bin'\]; valid: .*'bins'"):
        L.create_loss("mi", bin=16)
    with pytest.raises(ValueError, match="reduction"):
        L.MSELoss(reduction="avg")
    with pytest.raises(ValueError, match="kernel"):
        L.LNCCLoss(kernel="gauss")


def test_register_a_new_loss():
    @L.register_loss("test_half_mse")
    class HalfMSE(L.FunctionalLoss):
        function = staticmethod(
            lambda f, m, reduction="mean": 0.5 * L.mse(f, m, reduction=reduction)
        )
        kind = "similarity"

    x = torch.ones(1, 1, 4, 4)
    assert L.create_loss("test_half_mse")(x, 3 * x).item() == 2.0
    with pytest.raises(ValueError, match="already registered"):
        L.register_loss("test_half_mse")(HalfMSE)
