"""Random rigid/affine perturbations: parameters, matrices, and moved images checked against
scipy (``Rotation``, ``ndimage.affine_transform``) on real LPBA40 volumes and ants2d slices;
the ``perturb`` training source on real ants2d slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial.transform import Rotation

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.data.perturb import (
    PerturbedPairs,
    RandomPerturbation,
    apply_matrix_to_image,
    num_params,
    params_to_matrix,
    random_affine_params,
    random_rigid_params,
)
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.data.sources import source_kinds, synthetic_datasets
from learnreg.io.images import read_image, read_labels
from learnreg.metrics import mean_dice
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.sampling import warp


@pytest.fixture(scope="module")
def volume(lpba):
    """S11 at 8 mm (area-averaged) and its labels (centre voxel of each 8³ block)."""
    img = read_image(lpba / "images/S11.nii.gz").data[None].float()
    lab = read_labels(lpba / "labels/S11.nii.gz").data.long()
    return F.avg_pool3d(img, 8)[0], lab[:, 4::8, 4::8, 4::8]


@pytest.fixture(scope="module")
def slice2d(data_root):
    img = read_image(data_root / "ants2d/r16slice.jpg").data[None].float() / 255
    return F.avg_pool2d(img, 4)[0]  # (1, 64, 64)


def _reference_matrix(params: np.ndarray, kind: str, shape) -> np.ndarray:
    """Independent construction with scipy: x ↦ L (x − c) + c + t."""
    d = len(shape)
    c = (np.asarray(shape) - 1) / 2
    if kind == "rigid":
        if d == 3:
            lin = Rotation.from_rotvec(params[:3]).as_matrix()
        else:
            a = params[0]
            lin = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        t = params[-d:]
    else:
        m = params.reshape(d, d + 1)
        lin, t = np.eye(d) + m[:, :d], m[:, d]
    out = np.eye(d + 1)
    out[:d, :d] = lin
    out[:d, d] = t + c - lin @ c
    return out


@pytest.mark.parametrize("ndim", [2, 3])
def test_random_parameters_respect_their_ranges_and_the_generator(ndim):
    g = torch.Generator().manual_seed(3)
    p = random_rigid_params(500, ndim, rotation=12.0, translation=3.0, generator=g)
    nrot = 1 if ndim == 2 else 3
    assert p.shape == (500, num_params("rigid", ndim)) and p.dtype == torch.float32
    assert p[:, :nrot].abs().max() <= np.radians(12.0) + 1e-6
    assert p[:, :nrot].abs().max() > 0.9 * np.radians(12.0)  # the range is used
    assert p[:, nrot:].abs().max() <= 3.0 and p[:, nrot:].abs().max() > 2.7
    same = random_rigid_params(500, ndim, 12.0, 3.0, torch.Generator().manual_seed(3))
    assert torch.equal(p, same)

    a = random_affine_params(500, ndim, 5.0, 2.0, scale=0.2, shear=0.1, generator=g).double()
    assert a.shape == (500, num_params("affine", ndim))
    m = a.view(500, ndim, ndim + 1)
    lin = torch.eye(ndim, dtype=torch.float64) + m[..., :ndim]
    # L = R · Sh · diag(s): det L = Π s ∈ [0.8, 1.2]^D
    det = torch.linalg.det(lin)
    assert det.min() >= 0.8**ndim - 1e-6 and det.max() <= 1.2**ndim + 1e-6
    assert m[..., ndim].abs().max() <= 2.0
    # Sh · diag(s) is upper triangular with diagonal s, so it is the R factor of L's QR
    _, r = torch.linalg.qr(lin)
    s = r.diagonal(dim1=1, dim2=2).abs()
    assert s.min() >= 0.8 - 1e-6 and s.max() <= 1.2 + 1e-6


@pytest.mark.parametrize(
    "kind,shape", [("rigid", (20, 24, 20)), ("affine", (20, 24, 20)), ("rigid", (30, 40))]
)
def test_params_to_matrix_matches_scipy_reference(kind, shape):
    g = torch.Generator().manual_seed(1)
    d = len(shape)
    if kind == "rigid":
        p = random_rigid_params(4, d, 30.0, 5.0, g).double()
    else:
        p = random_affine_params(4, d, 30.0, 5.0, 0.2, 0.2, g).double()
    m = params_to_matrix(p, kind, shape)
    for i in range(4):
        np.testing.assert_allclose(
            m[i].numpy(), _reference_matrix(p[i].numpy(), kind, shape), atol=1e-10
        )


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 4)])
def test_index_matrix_displacement_matches_pointwise_reference(shape):
    """On the unit grid (world = index) an index-space matrix's displacement is M x − x."""
    d = len(shape)
    p = random_affine_params(2, d, 20.0, 3.0, 0.1, 0.1, torch.Generator().manual_seed(2))
    m = params_to_matrix(p.double(), "affine", shape)
    u = AffineTransform(m).voxel_displacement(Grid(shape)).double()
    assert u.shape == (2, d, *shape)
    for idx in [(0,) * d, tuple(s - 1 for s in shape), tuple(s // 2 for s in shape)]:
        x = np.append(np.asarray(idx, dtype=float), 1.0)
        want = (m[1].numpy() @ x)[:d] - x[:d]
        np.testing.assert_allclose(u[1][(slice(None), *idx)].numpy(), want, atol=1e-5)


def test_perturbed_volume_matches_scipy_and_labels_follow(volume):
    """moving' = moving ∘ T⁻¹ (scipy affine_transform, an independent resampler), labels
    moved the same way; warping moving' by T gives moving back inside the field of view."""
    image, labels = volume
    pert = RandomPerturbation("affine", rotation=10, translation=2, scale=0.1, shear=0.05)
    item = pert(
        {"fixed": image, "moving": image, "moving_labels": labels}, torch.Generator().manual_seed(5)
    )
    t = params_to_matrix(item["target"][None].double(), "affine", image.shape[1:])[0].numpy()
    inv = np.linalg.inv(t)
    ref = ndimage.affine_transform(image[0].double().numpy(), inv[:3, :3], inv[:3, 3], order=1)
    np.testing.assert_allclose(item["moving"][0].numpy(), ref, atol=1e-5)
    # labels: one-hot linear interpolation and argmax, by scipy
    lab = labels[0].numpy()
    values = np.unique(lab)
    scores = np.stack(
        [
            ndimage.affine_transform((lab == v).astype(float), inv[:3, :3], inv[:3, 3], order=1)
            for v in values
        ]
    )
    scores[0] += 1 - scores.sum(0) + 1e-9  # weight outside the image is background
    ref_lab = values[scores.argmax(0)]
    assert (ref_lab == item["moving_labels"][0].numpy()).mean() > 0.995
    assert mean_dice(labels[0], item["moving_labels"][0]) < 0.8  # it did move
    assert torch.equal(item["fixed"], image) and item["target"].shape == (12,)
    # undo: warp the perturbed image by T (fixed → moving)
    back = warp(
        item["moving"][None],
        AffineTransform(torch.as_tensor(t)[None].float()).voxel_displacement(Grid(image.shape[1:])),
    )
    inside = back[0] > 0.05
    err = (back[0] - image)[inside].abs().mean()
    assert err < 0.3 * (item["moving"] - image)[inside].abs().mean()


def test_self_pairs_and_2d(slice2d):
    pert = RandomPerturbation("rigid", rotation=15, translation=4, self_pairs=True)
    item = pert(
        {"fixed": torch.zeros_like(slice2d), "moving": slice2d}, torch.Generator().manual_seed(0)
    )
    assert torch.equal(item["fixed"], slice2d) and item["target"].shape == (3,)
    t = params_to_matrix(item["target"][None].double(), "rigid", (64, 64))[0].numpy()
    inv = np.linalg.inv(t)
    ref = ndimage.affine_transform(slice2d[0].double().numpy(), inv[:2, :2], inv[:2, 2], order=1)
    np.testing.assert_allclose(item["moving"][0].numpy(), ref, atol=1e-5)
    out, lab = apply_matrix_to_image(slice2d[None], torch.eye(3)[None])
    assert lab is None and torch.allclose(out, slice2d[None], atol=1e-6)


def test_perturbed_pairs_are_reproducible_per_index_and_epoch(volume):
    image, _ = volume
    base = [{"fixed": image, "moving": image}]
    ds = PerturbedPairs(base, RandomPerturbation("rigid"), seed=4, length=3)
    a, b = ds[1]["target"], ds[1]["target"]
    assert len(ds) == 3 and torch.equal(a, b) and not torch.equal(a, ds[2]["target"])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[1]["target"])
    with pytest.raises(IndexError):
        ds[3]


def test_bad_input_raises_clear_errors(volume):
    image, _ = volume
    with pytest.raises(ValueError, match="kind must be one of"):
        RandomPerturbation("similarity")
    with pytest.raises(ValueError, match="scale must be >= 0 and < 1"):
        RandomPerturbation("affine", scale=1.5)
    with pytest.raises(ValueError, match="rotation must be >= 0"):
        random_rigid_params(2, 3, rotation=-1)
    with pytest.raises(ValueError, match="ndim must be 2 or 3"):
        random_affine_params(2, 4)
    with pytest.raises(ValueError, match=r"must be \(N, 6\)"):
        params_to_matrix(torch.zeros(1, 12), "rigid", (4, 4, 4))
    with pytest.raises(ValueError, match=r"must be \(6,\)"):
        RandomPerturbation("rigid").apply({"fixed": image, "moving": image}, torch.zeros(3))
    with pytest.raises(ValueError, match="lacks 'fixed'"):
        RandomPerturbation("rigid")({"moving": image})
    with pytest.raises(ValueError, match=r"matrices for a 3D image must be \(N, 4, 4\)"):
        apply_matrix_to_image(image[None], torch.eye(3)[None])
    with pytest.raises(ValueError, match="empty"):
        PerturbedPairs([], RandomPerturbation())


# ---------------------------------------------------------------------------- training source
def test_perturb_source_builds_supervised_pairs_on_a_world_grid(data_root):
    """``data.synthetic: {kind: perturb}``: self-pairs of real slices on the network grid of
    the preprocessor, each moving image the fixed one moved by its known target; fixed
    validation draws; unknown keys and kinds raise InputError."""
    assert "perturb" in source_kinds()
    pre = Preprocessor(NetworkGrid(shape=(32, 32), spacing=(8.0, 8.0)))
    names = ["r16slice", "r27slice", "r30slice"]
    opts = {"kind": "perturb", "images": str(data_root / "ants2d"), "train": names}
    train, val = synthetic_datasets(
        {**opts, "val": ["r85slice"], "rotation": 12, "translation": 2, "length": 50}, pre
    )
    assert len(train) == 50 and len(val) == 2 and train.preprocessor is pre
    ref = read_image(data_root / "ants2d" / "r16slice.jpg")
    assert train.grid.allclose(pre.grid_for(ref)) and val.grid is train.grid
    item = train[7]
    assert item["target"].shape == (3,) and item["fixed"].shape == (1, 32, 32)
    assert item["target"][0].abs() <= np.radians(12) and item["target"][1:].abs().max() <= 2
    # moving = fixed ∘ T⁻¹ (the item's own fixed image: a self-pair)
    t = params_to_matrix(item["target"][None].double(), "rigid", (32, 32))
    again, _ = apply_matrix_to_image(item["fixed"][None], torch.linalg.inv(t))
    torch.testing.assert_close(again[0], item["moving"])
    assert torch.equal(train[7]["target"], item["target"])  # reproducible
    assert not torch.equal(val[0]["target"], val[1]["target"])
    # atlas-to-subject: the atlas is fixed, only the added part is the target
    atlas_train, none = synthetic_datasets(
        {**opts, "atlas": "r64slice", "transform": "affine", "length": 4}, pre
    )
    assert none is None and atlas_train[0]["target"].shape == (6,)
    atlas = pre.image(read_image(data_root / "ants2d" / "r64slice.jpg"), atlas_train.grid)
    torch.testing.assert_close(atlas_train[1]["fixed"], atlas.data)
    with pytest.raises(InputError, match="unknown config key data.synthetic.rotate.*valid keys"):
        synthetic_datasets({**opts, "rotate": 3}, pre)
    with pytest.raises(InputError, match="transform must be one of"):
        synthetic_datasets({**opts, "transform": "similarity"}, pre)
