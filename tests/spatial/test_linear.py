from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from learnreg.spatial import (
    Affine,
    AffineTransform,
    Rigid,
    Similarity,
    Translation,
    compose_affine,
    create_transform,
)
from learnreg.spatial.linear import rotation_matrix

torch.manual_seed(0)
DT = torch.float64


def _points(n: int, d: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, n, d, dtype=DT) * 50


def test_rotation_matches_scipy_and_closed_form() -> None:
    omega = torch.tensor([[0.3, -0.7, 1.1], [2.0, 0.1, -0.4]], dtype=DT)
    ref = Rotation.from_rotvec(omega.numpy()).as_matrix()
    np.testing.assert_allclose(rotation_matrix(omega).numpy(), ref, atol=1e-12)
    a = 0.8
    r2 = rotation_matrix(torch.tensor([[a]], dtype=DT))[0].numpy()
    np.testing.assert_allclose(r2, [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], atol=1e-12)


@pytest.mark.parametrize("d", [2, 3])
def test_rigid_preserves_distances_det_one(d: int) -> None:
    params = torch.randn(1, Rigid.num_params(d), dtype=DT)
    t = Rigid.from_params(params, center=torch.randn(d, dtype=DT) * 20)
    x = _points(20, d)
    y = t(x)
    np.testing.assert_allclose(torch.cdist(y, y).numpy(), torch.cdist(x, x).numpy(), atol=1e-9)
    m = t.homogeneous()[0, :d, :d]
    assert torch.linalg.det(m).item() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose((m.T @ m).numpy(), np.eye(d), atol=1e-12)


@pytest.mark.parametrize("d", [2, 3])
def test_rigid_center_is_fixed_itk_formula(d: int) -> None:
    r = d * (d - 1) // 2
    omega = torch.randn(1, r, dtype=DT)
    c = torch.tensor([10.0, -20.0, 35.0][:d], dtype=DT)
    params = torch.cat([omega, torch.zeros(1, d, dtype=DT)], 1)
    t = Rigid.from_params(params, center=c)
    np.testing.assert_allclose(t(c.view(1, 1, d))[0, 0].numpy(), c.numpy(), atol=1e-12)
    # with a translation: x -> R (x - c) + c + t
    shift = torch.tensor([[1.0, 2.0, 3.0][:d]], dtype=DT)
    t = Rigid.from_params(torch.cat([omega, shift], 1), center=c)
    a = float(omega[0, 0])
    rot = (
        Rotation.from_rotvec(omega[0].numpy()).as_matrix()
        if d == 3
        else np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    )
    x = _points(5, d)
    ref = (x[0].numpy() - c.numpy()) @ rot.T + c.numpy() + shift[0].numpy()
    np.testing.assert_allclose(t(x)[0].numpy(), ref, atol=1e-10)


@pytest.mark.parametrize("d", [2, 3])
def test_similarity_scales_distances(d: int) -> None:
    r = d * (d - 1) // 2
    p = torch.randn(1, Similarity.num_params(d), dtype=DT)
    p[0, r] = np.log(1.7)
    t = Similarity.from_params(p)
    x = _points(10, d)
    y = t(x)
    np.testing.assert_allclose(
        torch.cdist(y, y).numpy(), 1.7 * torch.cdist(x, x).numpy(), atol=1e-9
    )
    det = torch.linalg.det(t.homogeneous()[0, :d, :d]).item()
    assert det == pytest.approx(1.7**d, rel=1e-12)


@pytest.mark.parametrize("d", [2, 3])
def test_affine_and_translation_layout(d: int) -> None:
    m = np.eye(d, d + 1) + np.random.default_rng(1).normal(0, 0.2, (d, d + 1))
    t = Affine.from_params(torch.tensor((m - np.eye(d, d + 1)).reshape(1, -1)))
    x = _points(7, d)
    np.testing.assert_allclose(t(x)[0].numpy(), x[0].numpy() @ m[:, :d].T + m[:, d], atol=1e-10)
    c = np.array([5.0, -3.0, 2.0][:d])
    tc = Affine.from_params(torch.tensor((m - np.eye(d, d + 1)).reshape(1, -1)), center=c)
    ref = (x[0].numpy() - c) @ m[:, :d].T + c + m[:, d]
    np.testing.assert_allclose(tc(x)[0].numpy(), ref, atol=1e-10)
    shift = torch.arange(1.0, d + 1, dtype=DT)
    np.testing.assert_allclose(
        Translation.from_params(shift[None])(x)[0].numpy(), (x[0] + shift).numpy(), atol=1e-12
    )


@pytest.mark.parametrize("cls", [Translation, Rigid, Similarity, Affine])
@pytest.mark.parametrize("d", [2, 3])
def test_identity_inverse_and_batch(cls: type, d: int) -> None:
    ident = cls(d, batch=2)
    x = _points(6, d, batch=2).float()
    torch.testing.assert_close(ident(x), x)
    p = 0.1 * torch.randn(3, cls.num_params(d), dtype=DT)
    t = cls.from_params(p, center=torch.randn(3, d, dtype=DT))
    inv = t.inverse()
    assert type(inv) is AffineTransform
    x = _points(6, d, batch=3)
    np.testing.assert_allclose(inv(t(x)).numpy(), x.numpy(), atol=1e-9)
    # batch elements are independent: element 1 equals a transform built from row 1 alone
    one = cls.from_params(p[1:2], center=t.center[1:2])
    np.testing.assert_allclose(t(x)[1].numpy(), one(x[1:2])[0].numpy(), atol=1e-12)


def test_learnable_and_network_gradients() -> None:
    t = Rigid(3, learnable=True)
    assert [n for n, _ in t.named_parameters()] == ["params"]
    head = torch.randn(2, 6, dtype=DT, requires_grad=True)  # a "network output"
    s = Rigid.from_params(head)
    assert list(s.parameters()) == []
    s(_points(4, 3, batch=2)).sum().backward()
    assert head.grad is not None and head.grad.abs().sum() > 0
    # gradients also flow through the (exact) inverse
    head.grad = None
    Rigid.from_params(head).inverse()(_points(4, 3, batch=2)).sum().backward()
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_bad_params_raise() -> None:
    with pytest.raises(ValueError, match="P = "):
        Rigid.from_params(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="3D, not 2D"):
        Affine(2, params=torch.zeros(1, 12))


def test_compose_affine_order() -> None:
    a = Affine.from_params(0.3 * torch.randn(1, 6, dtype=DT))
    b = Rigid.from_params(torch.tensor([[0.5, 3.0, -1.0]], dtype=DT), center=[4.0, 4.0])
    x = _points(5, 2)
    np.testing.assert_allclose(compose_affine(a, b)(x).numpy(), a(b(x)).numpy(), atol=1e-10)
    assert not np.allclose(compose_affine(b, a)(x).numpy(), a(b(x)).numpy(), atol=1e-3)


@pytest.mark.parametrize("cls", [Translation, Rigid, Similarity, Affine])
@pytest.mark.parametrize("d", [2, 3])
def test_gradcheck(cls: type, d: int) -> None:
    p = (0.3 * torch.randn(1, cls.num_params(d), dtype=DT)).requires_grad_()
    c = torch.randn(1, d, dtype=DT, requires_grad=True)
    x = _points(2, d).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, c, x: cls.from_params(p, center=c)(x), (p, c, x))


def test_factory_names() -> None:
    assert isinstance(create_transform("rigid", ndim=3), Rigid)
    assert isinstance(create_transform("Affine", ndim=2, learnable=True), Affine)
    with pytest.raises(ValueError, match="valid names: .*affine"):
        create_transform("warp-drive")
