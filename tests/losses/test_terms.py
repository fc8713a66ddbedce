"""LossTerms: named weighted registry losses from a config spec."""

from __future__ import annotations

import pytest
import torch
import yaml

import learnreg.losses as L
from learnreg.losses.terms import LossTerms, TermSpec, parse_loss_spec


def pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 1, 12, 10, generator=g), torch.rand(2, 1, 12, 10, generator=g)


@pytest.mark.parametrize(
    "spec,expected",
    [
        (None, []),
        ({}, []),
        ("LNCC", [TermSpec("lncc", "lncc")]),
        (["lncc", {"mse": 0.5}], [TermSpec("lncc", "lncc"), TermSpec("mse", "mse", 0.5)]),
        ({"lncc": {"window": 5}}, [TermSpec("lncc", "lncc", 1.0, {"window": 5})]),
        ({"lncc": {"window": 5, "weight": 2}}, [TermSpec("lncc", "lncc", 2.0, {"window": 5})]),
        ({"mse": None, "l1": 0}, [TermSpec("mse", "mse"), TermSpec("l1", "l1", 0.0)]),
        ({"fine": {"loss": "LNCC", "window": 3}}, [TermSpec("fine", "lncc", 1.0, {"window": 3})]),
    ],
)
def test_spec_forms(spec, expected):
    assert parse_loss_spec(spec) == expected


def test_values_by_name_and_weighted_total():
    f, m = pair()
    terms = LossTerms({"lncc": {"window": 5}, "mse": 0.25, "ncc": 0.0}, "similarity")
    out = terms(f, m)
    assert set(out) == {"lncc", "mse", "ncc", "total"}
    assert out["lncc"].item() == L.lncc(f, m, window=5).item()
    assert out["mse"].item() == L.mse(f, m).item()
    assert out["ncc"].item() == L.ncc(f, m).item()  # weight 0: reported, not counted
    assert torch.equal(out["total"], out["lncc"] + 0.25 * out["mse"])
    assert terms.weights == {"lncc": 1.0, "mse": 0.25, "ncc": 0.0}
    assert terms.names == ("lncc", "mse", "ncc") and len(terms) == 3 and "mse" in terms
    assert terms["lncc"].options == {"window": 5} and terms.kind == "similarity"


def test_single_unit_term_total_is_exactly_the_loss():
    f, m = pair()
    f.requires_grad_(True)
    out = LossTerms("lncc", "similarity")(f, m)
    assert out["total"] is out["lncc"]
    assert torch.equal(out["total"], L.lncc(f, m))


def test_registry_defaults_and_aliases():
    f, m = pair()
    out = LossTerms({"nmi": {"bins": 8}, "cc": 1.0}, "similarity")(f, m)
    assert out["nmi"].item() == L.mutual_information(f, m, bins=8, normalized=True).item()
    assert out["cc"].item() == L.lncc(f, m).item()


def test_defaults_go_only_to_losses_that_take_them_and_the_spec_wins():
    terms = LossTerms(
        {"mi": {}, "lncc": {"window": 3}, "mse": 1.0},
        "similarity",
        defaults={"bins": 16, "window": 5, "samples": 100},
    )
    assert terms["mi"].options == {"bins": 16, "samples": 100}
    assert terms["lncc"].options == {"window": 3}
    assert terms["mse"].options == {}


def test_overrides_reach_the_terms_that_take_them():
    f, m = pair()
    terms = LossTerms({"lncc": 1.0, "mse": 1.0}, "similarity")
    out = terms(f, m, reduction="none")
    assert out["total"].shape == (2,)
    u = torch.randn(1, 2, 8, 7)
    reg = LossTerms({"diffusion": 1.0, "bending": 0.5}, "regularizer")
    out = reg(u, spacing=(2.0, 1.0))
    assert out["diffusion"].item() == L.diffusion(u, (2.0, 1.0)).item()
    assert out["bending"].item() == L.bending_energy(u, (2.0, 1.0)).item()
    with pytest.raises(ValueError, match=r"no term takes the option\(s\) \['spcing'\]"):
        reg(u, spcing=(2.0, 1.0))


def test_empty_terms_total_zero():
    f, _ = pair()
    out = LossTerms({}, "regularizer")(f)
    assert out == {"total": out["total"]} and out["total"].item() == 0.0


def test_to_spec_round_trips_through_yaml():
    f, m = pair()
    terms = LossTerms(
        {"fine": {"loss": "lncc", "window": 3}, "coarse": {"loss": "lncc", "window": 7}, "mse": 2}
    )
    spec = yaml.safe_load(yaml.safe_dump(terms.to_spec()))
    assert spec["fine"] == {"weight": 1.0, "loss": "lncc", "window": 3}
    again = LossTerms(spec)
    a, b = terms(f, m), again(f, m)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["fine"].item() != a["coarse"].item()  # the options reached each term


def test_terms_have_no_state():
    """Holding LossTerms in a method changes neither its parameters nor its state_dict."""
    terms = LossTerms({"lncc": 1.0, "mi": 1.0}, "similarity")
    assert terms.state_dict() == {} and not list(terms.parameters())


def test_helpful_errors():
    with pytest.raises(
        ValueError,
        match=r"^similarity: unknown loss 'lnc' \(did you mean 'lncc'.*; valid similarity "
        r"losses: .*mse",
    ):
        LossTerms("lnc", "similarity")
    with pytest.raises(
        ValueError,
        match=r"^regularization: 'lncc' is a similarity loss, not a regularizer loss; valid "
        r"regularizer losses: .*diffusion",
    ):
        LossTerms({"lncc": 1.0}, "regularizer", role="regularization")
    with pytest.raises(
        ValueError, match=r"similarity\.lncc: .*unknown option\(s\) \['windw'\]; valid: .*window"
    ):
        LossTerms({"lncc": {"windw": 5}}, "similarity")
    with pytest.raises(ValueError, match=r"similarity\.lncc: kernel must be one of"):
        LossTerms({"lncc": {"kernel": "gauss"}}, "similarity")
    with pytest.raises(ValueError, match=r"loss\.mse: weight must be finite and >= 0"):
        LossTerms({"mse": -1.0})
    with pytest.raises(ValueError, match="weight must be a number"):
        LossTerms({"mse": {"weight": "high"}})
    with pytest.raises(ValueError, match="expected a weight"):
        LossTerms({"mse": "high"})
    with pytest.raises(ValueError, match="given twice"):
        LossTerms(["mse", {"MSE": 2.0}])
    with pytest.raises(ValueError, match="'total' is reserved"):
        LossTerms({"total": {"loss": "mse"}})
    with pytest.raises(ValueError, match="different kinds"):
        LossTerms({"mse": 1.0, "diffusion": 1.0})
    with pytest.raises(ValueError, match="one-key mapping"):
        LossTerms([{"mse": 1.0, "l1": 1.0}])
    with pytest.raises(ValueError, match="expected a loss name, a list or a mapping"):
        LossTerms(3.0)


def test_available_losses_by_kind():
    sims = L.available_losses("similarity")
    assert {"lncc", "cc", "mse", "mi", "nmi"} <= set(sims) and "diffusion" not in sims
    assert set(L.available_losses(["label", "regularizer"])) >= {"dice", "bending"}
    assert L.available_losses() == sorted(set().union(*(L.available_losses(k) for k in L.KINDS)))
    cls, defaults = L.loss_class("NMI", "similarity")
    assert cls is L.MILoss and defaults == {"normalized": True}
    with pytest.raises(ValueError, match="kind must be one of"):
        L.available_losses("similarty")
