"""VoxelMorph family: shapes, identity start, losses, and brief training on real 2D brain slices
(:mod:`._brain_slices`: pairs among five ants2d slices for training, r85 never trained on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.losses import functional as LF
from learnreg.methods.base import RegistrationBatch
from learnreg.methods.registry import create_method
from learnreg.methods.voxelmorph import degree_matrix, kl_divergence, one_hot_union
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.fields import compose_displacements
from learnreg.spatial.filters import gaussian_blur
from learnreg.spatial.sampling import warp
from learnreg.spatial.svf import StationaryVelocityField

from ._brain_slices import evaluate, load_slices, mean, train

SMALL = {"enc_features": (16, 16, 16, 16), "dec_features": (16, 16, 16, 16, 16, 8)}
TINY = {"enc_features": (4, 8), "dec_features": (8, 8, 4)}


# ---------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def slices(data_root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return load_slices(data_root)


def build(name: str, **config):
    torch.manual_seed(0)  # deterministic initialization
    return create_method(name, ndim=2, **SMALL, **config)


# ---------------------------------------------------------------------------- training
def test_voxelmorph_trains_and_aligns_held_out_pairs(slices):
    method = train(build("voxelmorph", reg_weight=0.3), slices)
    rows = evaluate(method, slices)  # measured: Dice 0.59 -> 0.71, LNCC 0.36 -> 0.51
    assert mean(rows, "dice1") > mean(rows, "dice0") + 0.05
    assert all(r["dice1"] > r["dice0"] + 0.02 for r in rows)
    assert mean(rows, "cc1") > mean(rows, "cc0") + 0.08
    assert all(r["cc1"] > r["cc0"] for r in rows)


def test_voxelmorph_diff_trains_without_folding(slices):
    method = train(build("voxelmorph-diff"), slices)
    rows = evaluate(method, slices)  # measured: Dice 0.59 -> 0.67, LNCC 0.36 -> 0.46
    assert mean(rows, "dice1") > mean(rows, "dice0") + 0.04
    assert all(r["dice1"] > r["dice0"] for r in rows)
    assert mean(rows, "cc1") > mean(rows, "cc0") + 0.05
    assert all(r["detj"] > 0 for r in rows)  # diffeomorphic: no folding anywhere
    # predict uses the mean (deterministic); training forward samples
    fixed, moving = slices["r16"][0], slices["r85"][0]
    a, b = method.predict(fixed, moving), method.predict(fixed, moving)
    assert torch.equal(a.displacement, b.displacement)
    method.train()
    with torch.no_grad():
        c = method(fixed, moving)
    assert not torch.equal(c.displacement, a.displacement)
    assert isinstance(a.transform, StationaryVelocityField)
    assert torch.allclose(a.transform.velocity, a.extras["mean"])


def test_voxelmorph_weakly_improves_label_overlap(slices):
    method = build("voxelmorph-weakly", similarity=None, reg_weight=0.1)
    rows = evaluate(train(method, slices), slices)  # measured: Dice 0.59 -> 0.66
    assert mean(rows, "dice1") > mean(rows, "dice0") + 0.04
    assert all(r["dice1"] > r["dice0"] + 0.01 for r in rows)


# ---------------------------------------------------------------------------- units
CASES = [
    ("voxelmorph", {}),
    ("voxelmorph", {"similarity": "mse", "bidirectional": True}),
    ("voxelmorph", {"integration_steps": 7, "int_downsize": 2, "bidirectional": True}),
    ("voxelmorph-diff", {"bidirectional": True}),
    ("voxelmorph-weakly", {"label_loss": "multiscale_dice"}),
]


@pytest.mark.parametrize("ndim,shape", [(2, (16, 24)), (3, (8, 12, 8))])
@pytest.mark.parametrize("name,options", CASES)
def test_shapes_and_loss_terms(name, options, ndim, shape):
    torch.manual_seed(0)
    method = create_method(name, ndim=ndim, **TINY, **options)
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    out = method(fixed, moving)
    assert out.displacement.shape == (2, ndim, *shape)
    assert out.warped.shape == (2, 1, *shape)
    coarse = tuple(s // method.int_downsize for s in shape)
    if method.integration_steps:
        assert isinstance(out.transform, StationaryVelocityField)
        assert out.transform.velocity.shape == (2, ndim, *coarse)
    else:
        assert type(out.transform) is DisplacementField
    assert out.transform.grid.shape == coarse
    if method.bidirectional:
        assert out.extras["backward_displacement"].shape == out.displacement.shape
        assert out.extras["warped_fixed"].shape == fixed.shape
    labels = (torch.rand(2, 1, *shape) * 3).long(), (torch.rand(2, 1, *shape) * 3).long()
    terms = method.loss(RegistrationBatch(fixed, moving, *labels), out)
    assert "total" in terms and terms["total"].dim() == 0
    terms["total"].backward()
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["voxelmorph", "voxelmorph-weakly"])
def test_starts_at_identity(name):
    torch.manual_seed(0)
    method = create_method(name, ndim=2, **TINY)
    moving = torch.rand(1, 1, 16, 16)
    out = method.predict(torch.rand(1, 1, 16, 16), moving)
    assert out.displacement.abs().max() < 1e-3
    assert torch.allclose(out.warped, moving, atol=1e-3)
    diff = create_method("voxelmorph-diff", ndim=2, **TINY).predict(moving, moving)
    assert diff.displacement.abs().max() < 1e-3
    assert torch.allclose(diff.extras["log_variance"], torch.tensor(-10.0), atol=1e-6)


def test_checks_inputs():
    method = create_method("voxelmorph", ndim=2, **TINY)
    with pytest.raises(ValueError, match=r"\(N, 1, \*S\) with 2 spatial dims"):
        method(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 8))
    with pytest.raises(ValueError, match="divisible"):
        method(torch.rand(1, 1, 15, 16), torch.rand(1, 1, 15, 16))
    weak = create_method("voxelmorph-weakly", ndim=2, **TINY)
    fixed = torch.rand(1, 1, 16, 16)
    out = weak(fixed, fixed)  # forward never needs labels
    with pytest.raises(ValueError, match="needs fixed_labels and moving_labels"):
        weak.loss(RegistrationBatch(fixed, fixed), out)
    with pytest.raises(ValueError, match="integration_steps must be >= 1"):
        create_method("voxelmorph-diff", integration_steps=0)
    with pytest.raises(ValueError, match="label_loss"):
        create_method("voxelmorph-weakly", label_loss="ce")


def test_bidirectional_svf_backward_is_inverse():
    torch.manual_seed(0)
    method = create_method(
        "voxelmorph", ndim=2, integration_steps=7, bidirectional=True, int_downsize=2, **TINY
    )
    out = method.predict(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    back = out.transform.inverse().voxel_displacement(out.grid)
    assert torch.allclose(out.extras["backward_displacement"], back)
    assert torch.allclose(out.inverse_displacement(), back)
    # exp(v) ∘ exp(−v) ≈ id for a smooth velocity on the coarse grid, upsampled
    v = gaussian_blur(torch.randn(1, 2, 16, 16), 3.0)
    v = 3.0 * v / v.abs().max()
    grid, coarse = Grid((32, 32)), Grid((32, 32)).resized((16, 16))
    u = StationaryVelocityField(coarse, v, 7).voxel_displacement(grid)
    w = StationaryVelocityField(coarse, -v, 7).voxel_displacement(grid)
    assert u.abs().max() > 2.0
    residual = compose_displacements(u, w)[..., 4:-4, 4:-4]  # away from the border
    assert residual.abs().max() < 0.05 * u.abs().max()


def test_weakly_dice_term_uses_labels_and_is_differentiable():
    torch.manual_seed(0)
    method = create_method("voxelmorph-weakly", ndim=2, image_weight=0.0, **TINY)
    fixed = torch.rand(1, 1, 16, 16)
    labels = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    labels[..., 4:12, 4:12] = 5
    out = method(fixed, fixed)
    same = method.loss(RegistrationBatch(fixed, fixed, labels, labels), out)
    assert "similarity" not in same and same["dice"].item() < 1e-3
    shifted = labels.roll(3, dims=-1)
    terms = method.loss(RegistrationBatch(fixed, fixed, labels, shifted), out)
    assert terms["dice"].item() > 0.3
    terms["total"].backward()
    assert method.flow.conv.weight.grad.abs().sum() > 0
    fo, mo = one_hot_union(labels, shifted.clamp(max=3), include_background=True)
    assert fo.shape[1] == mo.shape[1] == 3  # union {0, 3, 5}


def test_kl_divergence_matches_the_paper():
    assert torch.equal(
        degree_matrix((3, 4)),
        torch.tensor([[2.0, 3, 3, 2], [3, 4, 4, 3], [2, 3, 3, 2]]),
    )
    lam = 10.0
    # sigma term is minimized at Σ = (λ D)^-1 (d/dlogσ² of λ D e^x − x is zero)
    deg = degree_matrix((6, 6)).expand(1, 2, 6, 6)
    best = -torch.log(lam * deg)
    zero = torch.zeros(1, 2, 6, 6)
    kl_best = kl_divergence(zero, best, lam)
    for delta in (-0.1, 0.1):
        assert kl_divergence(zero, best + delta, lam) > kl_best
    # precision term: ½ d · λ · ½ Σ_axes mean((Δμ)²) / d, i.e. λ μᵀLμ / 2 up to normalization
    mu = torch.zeros(1, 2, 6, 6)
    mu[:, :, :, 3:] = 1.0  # one step along axis 1: 6 of 30 axis-1 differences are 1
    extra = kl_divergence(mu, best, lam) - kl_best
    assert torch.isclose(extra, torch.tensor(0.5 * 2 * lam * 0.5 * (6 / 30) / 2))
    with pytest.raises(ValueError, match="kl_divergence"):
        kl_divergence(zero, zero[:, :1], lam)


def test_train_then_register_oblique_pair_replays_in_simpleitk(data_root, tmp_path):
    """Issue 11 proof: `learnreg train` a tiny model on real slices, `learnreg register
    --model` a pair at another spacing and an oblique direction, SimpleITK replays it."""

    from ._roundtrip import oblique_slices, register_and_replay, train

    slices = data_root / "ants2d"
    config = {
        "method": "voxelmorph",
        "method_config": {"ndim": 2, "enc_features": [8, 16], "dec_features": [16, 16, 8]},
        "data": {"images": str(slices), "shape": [64, 64], "levels": 2},
        "optimizer": {"lr": 1e-2},
        "steps": 10,
        "batch_size": 2,
    }
    ckpt = train(config, tmp_path / "train")
    report = register_and_replay(ckpt, *oblique_slices(data_root, "r64slice"), tmp_path / "out")
    assert report["manifest"]["info"]["transform"] == "DisplacementField"
    assert report["max_warp_mm"] > 1.0  # a real deformation (mm), not the identity
    print(f"MAD {report['mad']:.2e}, max |u| {report['max_warp_mm']:.2f} mm")


# ---------------------------------------------------------------------------- losses by name
def _pair_loss(method, seed: int = 0, labels: bool = False):
    g = torch.Generator().manual_seed(seed)
    fixed, moving = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    lab = (torch.rand(2, 1, 16, 16, generator=g) * 3).long() if labels else None
    out = method(fixed, moving)
    batch = RegistrationBatch(fixed, moving, lab, None if lab is None else lab.roll(2, -1))
    return batch, out, method.loss(batch, out)


def test_similarity_spec_is_the_loss_computed():
    torch.manual_seed(0)
    mse = create_method("voxelmorph", ndim=2, similarity={"mse": {}}, **TINY)
    batch, out, terms = _pair_loss(mse)
    assert torch.equal(terms["similarity"], LF.mse(batch.fixed, out.warped))
    assert mse.config["reg_weight"] == 0.01  # MSE alone: the paper's λ, as similarity="mse"
    torch.manual_seed(0)
    spec = create_method("voxelmorph", ndim=2, similarity={"lncc": {"window": 5}}, **TINY)
    batch, out, terms = _pair_loss(spec)
    assert torch.equal(terms["similarity"], LF.lncc(batch.fixed, out.warped, window=5))
    assert not torch.equal(terms["similarity"], LF.lncc(batch.fixed, out.warped))  # window reached
    torch.manual_seed(0)
    legacy = create_method("voxelmorph", ndim=2, similarity="lncc", window=5, **TINY)
    _, _, old = _pair_loss(legacy)
    assert old.keys() == terms.keys() and all(torch.equal(old[k], terms[k]) for k in old)


def test_weighted_similarity_terms_and_regularization_spec():
    torch.manual_seed(0)
    method = create_method(
        "voxelmorph",
        ndim=2,
        similarity={"lncc": {"window": 5}, "mse": {"weight": 0.5}},
        regularization={"bending": 0.25, "tv": {"weight": 0.0}},
        **TINY,
    )
    assert method.reg_weight is None and method.config["regularization"]["bending"] == 0.25
    batch, out, terms = _pair_loss(method)
    lncc5, mse = LF.lncc(batch.fixed, out.warped, window=5), LF.mse(batch.fixed, out.warped)
    field = out.extras["field"]
    assert torch.equal(terms["similarity_lncc"], lncc5) and torch.equal(
        terms["similarity_mse"], mse
    )
    assert torch.allclose(terms["similarity"], lncc5 + 0.5 * mse)
    assert "diffusion" not in terms  # the spec replaced the default regularizer
    assert torch.equal(terms["bending"], LF.bending_energy(field))
    assert torch.equal(terms["tv"], LF.total_variation(field))  # weight 0: reported only
    assert torch.allclose(terms["total"], terms["similarity"] + 0.25 * terms["bending"])
    none = create_method("voxelmorph", ndim=2, regularization={}, **TINY)
    _, _, terms = _pair_loss(none)
    assert set(terms) == {"similarity", "total"}


def test_weakly_label_loss_and_similarity_specs():
    torch.manual_seed(0)
    method = create_method(
        "voxelmorph-weakly",
        ndim=2,
        similarity=None,
        label_loss={"msdice": {"scales": [0, 1]}},
        regularization={"diffusion": 0.1},
        **TINY,
    )
    batch, out, terms = _pair_loss(method, labels=True)
    assert set(terms) == {"dice", "diffusion", "total"}
    fo, mo = one_hot_union(batch.fixed_labels, batch.moving_labels)
    expected = LF.multiscale_dice(fo, warp(mo, out.displacement), scales=[0, 1])
    assert torch.equal(terms["dice"], expected)
    with pytest.raises(ValueError, match="label_loss: 'lncc' is a similarity loss, not a label"):
        create_method("voxelmorph-weakly", ndim=2, label_loss="lncc", **TINY)


def test_loss_spec_errors_name_the_valid_choices():
    def make(**kw):
        return create_method("voxelmorph", ndim=2, **TINY, **kw)

    with pytest.raises(ValueError, match=r"similarity: unknown loss 'lnc' \(did you mean 'lncc'"):
        make(similarity={"lnc": {}})
    with pytest.raises(
        ValueError, match="similarity must be one of \\('lncc', 'mse'\\), got 'ncc'"
    ):
        make(similarity={"lncc": 1.0, "ncc": 1.0})
    with pytest.raises(
        ValueError, match="similarity: 'diffusion' is a regularizer loss, not a similarity loss"
    ):
        make(similarity="diffusion")
    with pytest.raises(
        ValueError,
        match=r"regularization: 'lncc' is a similarity loss.*valid regularizer losses: .*bending",
    ):
        make(regularization={"lncc": 1.0})
    with pytest.raises(ValueError, match=r"similarity\.lncc: .*\['windw'\]; valid: .*'window'"):
        make(similarity={"lncc": {"windw": 5}})
    with pytest.raises(ValueError, match="regularization.*or reg_weight.*not both"):
        make(regularization={"diffusion": 1.0}, reg_weight=0.5)
    with pytest.raises(ValueError, match="give the window in it"):
        make(similarity={"lncc": {}}, window=5)
    with pytest.raises(ValueError, match="window must be an odd positive int"):
        make(window=4)
    with pytest.raises(ValueError, match=r"taken by the method's own terms"):
        make(regularization={"dice": {"loss": "diffusion"}})
    with pytest.raises(ValueError, match="needs a similarity"):
        make(similarity=None)


def test_zoo_recipe_and_shipped_config_build_the_same_loss():
    """configs/zoo declares the shipped model's terms by name; the shipped checkpoint's older
    keys (similarity: lncc, window: 5, reg_weight: 1.0) build the same method and loss."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    recipe = yaml.safe_load((root / "configs/zoo/lpba40-vxm-svf.yaml").read_text())
    shipped = {
        "ndim": 3,
        "similarity": "lncc",
        "window": 5,
        "dice_weight": 1.0,
        "reg_weight": 1.0,
        "integration_steps": 7,
        "int_downsize": 2,
    }  # method_config of src/learnreg/zoo/lpba40-vxm-svf/model.pt
    small = {"enc_features": (4, 8), "dec_features": (8, 8, 4)}
    torch.manual_seed(0)
    old = create_method(recipe["method"], **shipped, **small)
    new = create_method(recipe["method"], **recipe["method_config"], **small)
    new.load_state_dict(old.state_dict())
    assert old.state_dict().keys() == new.state_dict().keys()
    g = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(1, 1, 8, 12, 8, generator=g), torch.rand(1, 1, 8, 12, 8, generator=g)
    lab = (torch.rand(1, 1, 8, 12, 8, generator=g) * 4).long()
    batch = RegistrationBatch(fixed, moving, lab, lab.flip(-1))
    with torch.no_grad():
        a, b = (
            old.loss(batch, old.predict(fixed, moving)),
            new.loss(batch, new.predict(fixed, moving)),
        )
    assert a.keys() == b.keys() == {"similarity", "dice", "diffusion", "total"}
    assert all(torch.equal(a[k], b[k]) for k in a)
