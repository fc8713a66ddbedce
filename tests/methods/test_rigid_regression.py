"""Rigid regression (Sloan et al. 2018): parameter conventions against scipy, the strided
(pool-free) encoder, the supervised loss with inverse consistency, and brief training on real
LPBA40 volumes (8 mm) moved by known random rigid transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation
from torch import nn

from learnreg.data.datasets import collate_pairs
from learnreg.data.perturb import PerturbedPairs, RandomPerturbation, params_to_matrix
from learnreg.io.images import read_image
from learnreg.methods.base import RegistrationBatch
from learnreg.methods.dlir import affine_displacement
from learnreg.methods.registry import create_method, method_info
from learnreg.methods.rigid_regression import (
    RigidRegression,
    invert_rigid,
    rigid_errors,
    rigid_matrix,
)

SHAPE = (20, 24, 20)  # LPBA40 at 8 mm
SMALL = {"shape": SHAPE, "features": (8, 16, 32), "merge_features": (32,), "hidden": (64,)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def volumes(lpba) -> dict[str, torch.Tensor]:
    """S11–S16 (training) and S35, S36 (held out), area-averaged to 8 mm, max-normalized."""
    out = {}
    for n in ("S11", "S12", "S13", "S14", "S15", "S16", "S35", "S36"):
        x = F.avg_pool3d(read_image(lpba / f"images/{n}.nii.gz").data[None].float(), 8)[0]
        out[n] = x / x.amax()
    return out


def _brain_error(pred: torch.Tensor, target: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean |P x − T x| (voxels) over the brain voxels of each fixed image."""
    mp, mt = rigid_matrix(pred, SHAPE), rigid_matrix(target, SHAPE)
    errs = []
    for i in range(len(pred)):
        pts = torch.nonzero(fixed[i, 0] > 0.05).float()
        ph = torch.cat([pts, torch.ones(len(pts), 1)], 1)
        errs.append((ph @ (mp[i] - mt[i]).T)[:, :3].norm(dim=1).mean())
    return torch.stack(errs)


# ---------------------------------------------------------------------------- conventions
def test_registered_with_table_attributes_and_config():
    info = method_info("sloan")
    assert info.name == "rigid-regression" and info.year == 2018
    assert info.supervision == "supervised" and info.transform == "rigid"
    m = create_method("rigid-regression")
    assert m.config["shape"] == (40, 48, 40)  # resolved default
    assert create_method("rigid-regression", ndim=2).config["shape"] == (64, 64)
    clone = type(m)(**m.config)
    clone.load_state_dict(m.state_dict())


@pytest.mark.parametrize("ndim", [2, 3])
def test_rigid_matrix_inverse_and_errors_match_scipy(ndim):
    g = torch.Generator().manual_seed(0)
    r = 1 if ndim == 2 else 3
    p = torch.cat([torch.rand(5, r, generator=g) - 0.5, 6 * torch.rand(5, ndim, generator=g)], 1)
    p = p.double()
    shape = SHAPE if ndim == 3 else (30, 34)
    m = rigid_matrix(p, shape)
    torch.testing.assert_close(m, params_to_matrix(p, "rigid", shape))
    if ndim == 3:
        np.testing.assert_allclose(
            m[:, :3, :3].numpy(), Rotation.from_rotvec(p[:, :3].numpy()).as_matrix(), atol=1e-12
        )
    inv = rigid_matrix(invert_rigid(p), shape)
    torch.testing.assert_close(inv, torch.linalg.inv(m))
    # a known relative rotation of 7° about one axis and a (3, 4[, 0]) translation offset
    q = p.clone()
    q[:, r] += 3.0
    q[:, r + 1] += 4.0
    if ndim == 3:
        rel = Rotation.from_rotvec(p[:, :3].numpy()) * Rotation.from_rotvec([0, 0, np.radians(7)])
        q[:, :3] = torch.as_tensor(rel.as_rotvec())
    else:
        q[:, 0] += np.radians(7)
    err = rigid_errors(q, p)
    torch.testing.assert_close(err["rotation"], torch.full((5,), 7.0, dtype=p.dtype))
    torch.testing.assert_close(err["translation"], torch.full((5,), 5.0, dtype=p.dtype))


@pytest.mark.parametrize("mode", ["siamese", "two-channel"])
def test_encoder_has_strided_convolutions_and_no_max_pooling(mode):
    m = RigidRegression(3, mode=mode, **SMALL)
    modules = list(m.modules())
    assert not any(isinstance(x, (nn.MaxPool3d, nn.AvgPool3d)) for x in modules)
    strides = [x.stride for x in modules if isinstance(x, nn.Conv3d)]
    assert strides.count((2, 2, 2)) == (4 if mode == "siamese" else 3)
    assert (m.regressor.encoder.other_tower is None) and m.regressor.encoder.mode == mode


@pytest.mark.parametrize("ndim", [2, 3])
def test_forward_is_near_identity_and_consistent_with_its_parameters(ndim):
    shape = SHAPE if ndim == 3 else (32, 32)
    torch.manual_seed(0)
    m = RigidRegression(ndim, shape=shape, features=(4, 8), merge_features=(8,), hidden=(16,))
    x = torch.rand(2, 1, *shape)
    y = torch.rand(2, 1, *shape)
    out = m.predict(x, y)
    assert out.displacement.shape == (2, ndim, *shape) and "params_backward" not in out.extras
    assert out.displacement.abs().max() < 0.5  # small init: (almost) the identity
    torch.testing.assert_close(
        out.displacement, affine_displacement(rigid_matrix(out.extras["params"], shape), shape)
    )
    m.train()
    assert m(x, y).extras["params_backward"].shape == out.extras["params"].shape


def test_loss_is_zero_for_a_perfect_prediction_and_needs_a_target(volumes):
    m = RigidRegression(3, **SMALL, consistency_weight=1.0)
    target = torch.tensor([[0.05, -0.1, 0.08, 1.5, -2.0, 0.5]])
    x = volumes["S11"][None]
    with torch.no_grad():  # head outputs exactly target (normalized): zero weights, bias
        m.regressor.head.out.weight.zero_()
        m.regressor.head.out.bias.copy_(target[0] / m.scales(target))
    m.train()
    m.bidirectional = False
    out = m(x, x)
    terms = m.loss(RegistrationBatch(x, x, target=target), out)
    assert float(terms["total"].detach()) < 1e-10 and float(terms["rotation_error"]) < 1e-2
    # bidirectional: the same output for swapped inputs is wrong by the inverse
    m.bidirectional = True
    terms = m.loss(RegistrationBatch(x, x, target=target), m(x, x))
    want = F.mse_loss(target / m.scales(target), invert_rigid(target) / m.scales(target))
    torch.testing.assert_close(terms["mse_backward"], want)
    assert float(terms["consistency"].detach()) > 0.1
    with pytest.raises(ValueError, match="supervised: the batch needs `target`"):
        m.loss(RegistrationBatch(x, x), out)
    with pytest.raises(ValueError, match="built for images of size"):
        m(torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="mode must be one of"):
        RigidRegression(3, mode="pseudo")
    with pytest.raises(ValueError, match="translation_scale must be positive"):
        RigidRegression(3, translation_scale=0)


# ---------------------------------------------------------------------------- training
def test_training_on_known_rigid_transforms_reduces_the_error(volumes):
    """150 steps of 4 self-pairs (subject, subject moved by a random rigid transform of up to
    10° per axis and 2 voxels = 16 mm per axis): on held-out subjects the residual error
    falls well below the identity's, and swapping the inputs nearly inverts the prediction."""
    pert = RandomPerturbation("rigid", rotation=10, translation=2, self_pairs=True)
    train = [{"fixed": None, "moving": volumes[f"S1{i}"]} for i in range(1, 7)]
    test = [{"fixed": None, "moving": volumes[n]} for n in ("S35", "S36")]
    data = PerturbedPairs(train, pert, seed=0, length=10**6)
    held = collate_pairs([PerturbedPairs(test, pert, seed=99, length=12)[i] for i in range(12)])
    torch.manual_seed(0)
    m = RigidRegression(3, translation_scale=2.0, **SMALL)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    for step in range(150):
        b = collate_pairs([data[step * 4 + i] for i in range(4)])
        terms = m.loss(b, m(b.fixed, b.moving))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    pred = m.predict(held.fixed, held.moving).extras["params"]
    err = _brain_error(pred, held.target, held.fixed).mean()
    err0 = _brain_error(torch.zeros_like(pred), held.target, held.fixed).mean()
    e, e0 = rigid_errors(pred, held.target), rigid_errors(torch.zeros_like(pred), held.target)
    # measured (1 thread): brain error 2.0 → ~1.0 voxels; translation 1.9 → ~0.4 voxels
    assert err < 0.75 * err0
    assert e["translation"].mean() < 0.5 * e0["translation"].mean()
    assert e["rotation"].mean() < e0["rotation"].mean()
    ic = m.inverse_consistency_error(held.fixed, held.moving)
    assert ic.mean() < 0.5 * err0
