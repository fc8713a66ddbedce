"""VoxelMorph family: shapes, identity start, losses, and brief training on real 2D brain slices.

Training tests use the six ants2d axial T1 slices (cropped to the head, 64×64, intensity /255):
pairs among r16, r27, r30, r62, r64 for training, r85 held out. Alignment is scored by the Dice
of three intensity classes (smoothed image split at the brain's tertiles; background 0) and by
LNCC, before (identity) and after warping with the trained network's prediction.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from learnreg.eval.metrics import mean_dice
from learnreg.io.images import read_image
from learnreg.losses.functional import lncc
from learnreg.methods.base import RegistrationBatch
from learnreg.methods.registry import create_method
from learnreg.methods.voxelmorph import degree_matrix, kl_divergence, one_hot_union
from learnreg.spatial.differential import jacobian_determinant
from learnreg.spatial.fields import compose_displacements
from learnreg.spatial.filters import gaussian_blur
from learnreg.spatial.sampling import warp

SMALL = {"enc_features": (16, 16, 16, 16), "dec_features": (16, 16, 16, 16, 16, 8)}
TINY = {"enc_features": (4, 8), "dec_features": (8, 8, 4)}
TRAIN = ("r16", "r27", "r30", "r62", "r64")
TEST = (("r16", "r85"), ("r85", "r27"), ("r30", "r85"), ("r85", "r62"))  # (fixed, moving)


# ---------------------------------------------------------------------------- real data
def tissue_labels(x: torch.Tensor) -> torch.Tensor:
    """0 background, 1-3 tertiles of the (σ=1 smoothed) brain intensities."""
    x = gaussian_blur(x, 1.0)
    brain = x > 0.1
    q = torch.quantile(x[brain], torch.tensor([1 / 3, 2 / 3]))
    return (brain.long() + (x >= q[0]).long() + (x >= q[1]).long()) * brain.long()


@pytest.fixture(scope="module")
def slices(data_root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name in (*TRAIN, "r85"):
        img = read_image(data_root / "ants2d" / f"{name}slice.jpg").data[None] / 255.0
        img = F.interpolate(img[..., 32:224, 32:224], size=(64, 64), mode="area")
        out[name] = (img, tissue_labels(img))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Training on 2 shared cores is several times faster on one thread than on two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stack(names, slices):
    """Images and labels of ``names`` as two ``(N, 1, H, W)`` batches."""
    return (torch.cat([slices[n][k] for n in names]) for k in (0, 1))


def build(name: str, **config):
    torch.manual_seed(0)  # deterministic initialization
    return create_method(name, ndim=2, **SMALL, **config)


def train(method, slices, steps: int = 300, lr: float = 3e-3, batch: int = 4):
    """Minimal loop: Adam on random training pairs (labels given to the loss only)."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(method.parameters(), lr=lr)
    method.train()
    for _ in range(steps):
        idx = torch.randint(len(TRAIN), (batch, 2), generator=gen)
        fixed, fixed_lab = stack([TRAIN[i] for i in idx[:, 0]], slices)
        moving, moving_lab = stack([TRAIN[i] for i in idx[:, 1]], slices)
        batch_ = RegistrationBatch(fixed, moving, fixed_lab, moving_lab)
        terms = method.loss(batch_, method(batch_.fixed, batch_.moving))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    return method


def evaluate(method, slices):
    """Per held-out pair: Dice and LNCC before/after, min det J of the predicted field."""
    rows = []
    for f, m in TEST:
        (fixed, fixed_lab), (moving, moving_lab) = slices[f], slices[m]
        out = method.predict(fixed, moving)  # no labels needed
        warped_lab = warp(moving_lab, out.displacement, mode="label")
        rows.append(
            {
                "dice0": mean_dice(fixed_lab, moving_lab, [1, 2, 3]),
                "dice1": mean_dice(fixed_lab, warped_lab, [1, 2, 3]),
                "cc0": -float(lncc(fixed, moving)),
                "cc1": -float(lncc(fixed, out.warped)),
                "detj": float(jacobian_determinant(out.displacement).min()),
            }
        )
    return rows


def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


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
    assert torch.allclose(a.velocity, a.extras["mean"])


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
    if method.integration_steps:
        coarse = tuple(s // method.int_downsize for s in shape)
        assert out.velocity.shape == (2, ndim, *coarse)
    else:
        assert out.velocity is None
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
    back = method.to_displacement(-out.velocity, (32, 32))
    assert torch.allclose(out.extras["backward_displacement"], back)
    # exp(v) ∘ exp(−v) ≈ id for a smooth velocity on the coarse grid, upsampled
    v = gaussian_blur(torch.randn(1, 2, 16, 16), 3.0)
    v = 3.0 * v / v.abs().max()
    u, w = method.to_displacement(v, (32, 32)), method.to_displacement(-v, (32, 32))
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
