"""Random affine / TPS / dense warps of real images: pairs satisfy moving ∘ T = fixed,
reproducibly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.data.datasets import collate_pairs
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.data.random_warps import (
    LPBA_HELDOUT,
    RandomWarpPairs,
    affine_points,
    lpba_volumes,
    random_smooth_displacement,
    random_tps_displacements,
    split_affine_tps,
    tps_points,
)
from learnreg.data.sources import synthetic_datasets
from learnreg.data.synthetic import brain_slice_images
from learnreg.spatial.sampling import sample_index

skimage = pytest.importorskip("skimage")
from skimage.transform import AffineTransform as SkAffine  # noqa: E402
from skimage.transform import ThinPlateSplineTransform  # noqa: E402


@pytest.fixture(scope="module")
def slices() -> dict[str, torch.Tensor]:
    return brain_slice_images("train", (96, 96))


@pytest.fixture(scope="module")
def volumes() -> dict[str, torch.Tensor]:
    return lpba_volumes(["S11", "S12"], factor=8)  # 20×24×20


def test_control_points_span_the_grid() -> None:
    """The one control lattice (``Grid.index_lattice``) the data and the methods share."""
    cp = Grid((5, 9)).index_lattice(3)
    assert cp.shape == (9, 2)
    torch.testing.assert_close(cp[0], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(cp[1], torch.tensor([0.0, 4.0]))  # last axis fastest
    torch.testing.assert_close(cp[-1], torch.tensor([4.0, 8.0]))
    assert Grid((20, 24, 20)).index_lattice((6, 6, 6)).shape == (216, 3)
    with pytest.raises(ValueError, match="grid_size"):
        tps_points(torch.zeros(1, 1, 2), (8, 8), 1, torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="shape"):
        tps_points(torch.zeros(1, 3, 1), (8,), 3, torch.zeros(1, 1, 1))


def test_tps_points_match_skimage_thin_plate_spline() -> None:
    g = torch.Generator().manual_seed(0)
    delta = random_tps_displacements(1, 9, 2, 3.0, g).double()
    assert delta.abs().max() <= 3.0 and delta.shape == (1, 9, 2)
    cp = Grid((32, 40)).index_lattice(3, torch.float64)
    pts = torch.rand(1, 50, 2, generator=g, dtype=torch.float64) * torch.tensor([31.0, 39.0])
    ours = tps_points(delta, (32, 40), 3, pts)[0].numpy()
    if hasattr(ThinPlateSplineTransform, "from_estimate"):
        ref = ThinPlateSplineTransform.from_estimate(cp.numpy(), (cp + delta[0]).numpy())
    else:  # scikit-image < 0.26
        ref = ThinPlateSplineTransform()
        assert ref.estimate(cp.numpy(), (cp + delta[0]).numpy())
    np.testing.assert_allclose(ours, ref(pts[0].numpy()), atol=1e-6)
    # interpolates the control points
    at = tps_points(delta, (32, 40), 3, cp[None])[0]
    torch.testing.assert_close(at, cp + delta[0])


def test_affine_points_match_skimage() -> None:
    from learnreg.data.perturb import random_affine_params

    p = random_affine_params(1, 2, 20.0, 5.0, 0.2, 0.1, torch.Generator().manual_seed(3))
    shape = (32, 40)
    c = np.array([15.5, 19.5])
    pts = torch.rand(1, 30, 2, dtype=torch.float64) * 30
    ours = affine_points(p, shape, pts)[0].numpy()
    m = p.double().view(2, 3).numpy()
    lin, t = m[:, :2] + np.eye(2), m[:, 2]
    ref = SkAffine(matrix=np.block([[lin, (c + t - lin @ c)[:, None]], [np.zeros((1, 2)), 1]]))
    np.testing.assert_allclose(ours, ref(pts[0].numpy()), atol=1e-9)


@pytest.mark.parametrize("kind", ["affine", "tps", "dense", "affine+tps"])
def test_pairs_2d_moving_through_t_is_fixed(kind, slices) -> None:
    ds = RandomWarpPairs(slices, kind, (48, 48), 8, seed=5, translation=3.0, magnitude=3.0)
    item = ds[2]
    assert item["fixed"].shape == (1, 48, 48) and item["moving"].shape == (1, 48, 48)
    shapes = {"affine": (6,), "tps": (9, 2), "dense": (2, 48, 48), "affine+tps": (24,)}
    assert item["target"].shape == shapes[kind]
    k, origin, params = ds.draw(2)
    torch.testing.assert_close(params.float(), item["target"])
    # fixed(x) = I(p + T(x)) from the source image; moving(y) = I(p + y)
    src = ds.images[k]
    sl = tuple(slice(int(o), int(o) + 48) for o in origin)
    torch.testing.assert_close(item["moving"][0], src[sl])
    pts = ds._points
    mapped = ds.transform_points(params[None].double(), pts) + origin
    ref = sample_index(src[None, None].double(), mapped.reshape(1, 48, 48, 2))[0, 0]
    torch.testing.assert_close(item["fixed"][0], ref.float(), atol=2e-5, rtol=0)
    # moving ∘ T ≈ fixed where T(x) stays inside the crop (interpolation error only)
    t = ds.transform_points(params[None].double(), pts).reshape(48, 48, 2)
    inside = ((t >= 0) & (t <= 47)).all(-1)
    warped = sample_index(item["moving"][None].double(), t[None])[0, 0].float()
    diff = (warped - item["fixed"][0])[inside].abs().mean()
    assert diff < 0.25 * (item["moving"][0] - item["fixed"][0])[inside].abs().mean()
    # reproducible, and a different seed gives different pairs
    torch.testing.assert_close(ds[2]["fixed"], item["fixed"])
    other = RandomWarpPairs(slices, kind, (48, 48), 8, seed=6)
    assert not torch.equal(other[2]["target"], item["target"])
    b = collate_pairs([ds[i] for i in range(4)])
    assert b.target.shape == (4, *item["target"].shape)


def test_affine_tps_pairs_are_the_spline_then_the_affine(slices) -> None:
    """T = A ∘ S: the composite's points are the affine of the spline's points."""
    ds = RandomWarpPairs(slices, "affine+tps", (48, 48), 4, seed=1, magnitude=3.0)
    params = ds.draw(0)[2][None].double()
    affine, tps = split_affine_tps(params, 2)
    pts = ds._points
    want = affine_points(affine, (48, 48), tps_points(tps, (48, 48), 3, pts))
    torch.testing.assert_close(ds.transform_points(params, pts), want)
    assert float((want - affine_points(affine, (48, 48), pts)).abs().max()) > 0.5
    with pytest.raises(ValueError, match=r"\(N, 6 \+ K\*2\)"):
        split_affine_tps(params[:, :7], 2)


def test_smooth_displacement_bounds_and_frequencies() -> None:
    g = torch.Generator().manual_seed(3)
    coarse = random_smooth_displacement((64, 64), [32], [4.0], g)
    fine = random_smooth_displacement((64, 64), [4], [4.0], g)
    assert coarse.shape == fine.shape == (2, 64, 64) and coarse.dtype == torch.float64
    assert coarse.abs().max() <= 4.0 and fine.abs().max() <= 4.0
    assert fine.abs().max() > 2.0  # the range is used

    def roughness(u):
        return float(torch.diff(u, dim=1).square().mean() + torch.diff(u, dim=2).square().mean())

    assert roughness(fine) > 10 * roughness(coarse)
    both = random_smooth_displacement((64, 64), [32, 4], [4.0, 1.0], torch.Generator())
    assert both.abs().max() <= 5.0
    assert random_smooth_displacement((8, 8, 8), [4], [1.0]).shape == (3, 8, 8, 8)
    with pytest.raises(ValueError, match="one magnitude per spacing"):
        random_smooth_displacement((8, 8), [4, 2], [1.0])
    with pytest.raises(ValueError, match="spacings must be >= 1"):
        random_smooth_displacement((8, 8), [0], [1.0])


def test_dense_pairs_3d_match_scipy_resampling(volumes) -> None:
    """The fixed volume is the source sampled at ``x + target(x)`` (scipy's linear
    interpolation as the independent reference)."""
    from scipy.ndimage import map_coordinates

    ds = RandomWarpPairs(
        volumes, "dense", None, 2, field_spacings=(8,), field_magnitudes=(2.0,), seed=4
    )
    item = ds[1]
    u = item["target"].double().numpy()
    assert u.shape == (3, 20, 24, 20)
    k, _, _ = ds.draw(1)
    coords = np.indices((20, 24, 20)).astype(np.float64) + u
    ref = map_coordinates(ds.images[k].double().numpy(), coords, order=1, cval=0.0)
    np.testing.assert_allclose(item["fixed"][0].numpy(), ref, atol=1e-4)
    assert not torch.allclose(item["fixed"], item["moving"])


def test_pairs_3d_tps_on_lpba_volumes(volumes) -> None:
    ds = RandomWarpPairs(volumes, "tps", None, 4, grid_size=4, magnitude=2.0, seed=1)
    item = ds[0]
    assert ds.shape == (20, 24, 20) and item["fixed"].shape == (1, 20, 24, 20)
    # the volumes' physical 8 mm RAS grid is the network grid, recorded for prediction
    assert isinstance(volumes["S11"], Image) and ds.grid.allclose(volumes["S11"].grid)
    assert ds.grid.spacing == (8.0, 8.0, 8.0) and np.allclose(ds.grid.direction, np.eye(3))
    assert ds.preprocessor.network.spacing == (8.0, 8.0, 8.0)
    assert item["target"].shape == (64, 3) and item["target"].abs().max() <= 2.0
    torch.testing.assert_close(item["origin"], torch.zeros(3))  # whole volume
    k, _, params = ds.draw(0)
    torch.testing.assert_close(item["moving"][0], ds.images[k])
    pts = ds._points
    t = tps_points(params[None].double(), ds.shape, 4, pts).reshape(1, 20, 24, 20, 3)
    ref = sample_index(ds.images[k][None, None].double(), t)[0, 0].float()
    torch.testing.assert_close(item["fixed"][0], ref, atol=1e-4, rtol=0)
    assert not torch.allclose(item["fixed"], item["moving"])
    # fixed_border: only the 2×2×2 inner control points of a 4×4×4 grid move
    inner = RandomWarpPairs(volumes, "tps", None, 4, grid_size=4, fixed_border=True, seed=1)
    t = inner[0]["target"]
    moved = t.abs().sum(1) > 0
    assert int(moved.sum()) == 8 and torch.equal(moved, inner.inner_mask().bool())
    assert inner.inner_mask().reshape(4, 4, 4)[1:3, 1:3, 1:3].all()
    with pytest.raises(ValueError, match="fixed_border"):
        RandomWarpPairs(volumes, "tps", None, 4, grid_size=2, fixed_border=True)


def test_bad_arguments_raise(slices) -> None:
    with pytest.raises(ValueError, match="kind"):
        RandomWarpPairs(slices, "bspline", (48, 48))
    with pytest.raises(ValueError, match="smaller than"):
        RandomWarpPairs(slices, "affine", (128, 128))
    with pytest.raises(ValueError, match="2D or all 3D"):
        RandomWarpPairs({"a": torch.zeros(8, 8), "b": torch.zeros(8, 8, 8)}, "affine")
    with pytest.raises(ValueError, match="scale"):
        RandomWarpPairs(slices, "affine", (48, 48), scale=1.5)
    with pytest.raises(ValueError, match="no images"):
        RandomWarpPairs({}, "affine")
    with pytest.raises(ValueError, match=r"\(N, 9, 2\)"):
        tps_points(torch.zeros(1, 8, 2), (16, 16), 3, torch.zeros(1, 4, 2))
    with pytest.raises(IndexError):
        RandomWarpPairs(slices, "affine", (48, 48), 3).draw(3)


def test_lpba_volumes_are_the_preprocessed_images(volumes, lpba) -> None:
    """Each volume is what the recorded preprocessing makes of the 1 mm image at prediction
    time (world-space resampling onto the RAS grid: LPBA40 is stored LAS)."""
    from learnreg.io.images import read_image

    image = read_image(lpba / "images" / "S12.nii.gz")
    pre = Preprocessor(NetworkGrid((20, 24, 20)), percentiles=None)
    grid = pre.grid_for(image)
    assert grid.allclose(volumes["S12"].grid)
    torch.testing.assert_close(volumes["S12"].data, pre.image(image, grid).data)
    # RAS: index axis 0 runs towards +x (the stored array runs towards -x)
    assert grid.affine[0, 0] > 0 and image.grid.affine[0, 0] < 0


def test_warp_source_for_the_trainer(lpba) -> None:
    """``data.synthetic: {kind: warp}``: 2D crops of photos on the crop grid, LPBA40 volumes
    on their physical grid, held-out images for validation."""
    pre = Preprocessor(NetworkGrid((32, 32), None, "RAS", 4), (1.0, 99.0))
    train, val = synthetic_datasets(
        {"kind": "warp", "transform": "tps", "length": 3, "val_length": 2, "magnitude": 2.0},
        pre,
    )
    assert train.kind == "tps" and train.grid.shape == (32, 32) and len(val) == 2
    assert train.preprocessor.network.shape == (32, 32) and train.preprocessor.network.levels == 0
    assert train[0]["target"].shape == (9, 2) and not set(train.names) & set(val.names)
    pre3 = Preprocessor(NetworkGrid((20, 24, 20), None, "RAS", 4), None)
    opts = {"kind": "warp", "images": "lpba40", "subjects": ["S11"], "transform": "affine"}
    tr, va = synthetic_datasets({**opts, "val_subjects": ["S35"], "length": 2}, pre3)
    assert tr.grid.spacing == (8.0, 8.0, 8.0) and va.grid.allclose(tr.grid)
    assert tr.preprocessor.network.spacing == (8.0, 8.0, 8.0) and va.names == ["S35"]
    assert tr[0]["target"].shape == (12,) and tr[1]["fixed"].shape == (1, 20, 24, 20)
    assert set(LPBA_HELDOUT) >= set(va.names)
    with pytest.raises(InputError, match="transform must be one of"):
        synthetic_datasets({**opts, "transform": "bspline"}, pre3)
    with pytest.raises(InputError, match="unknown config key data.synthetic.rotaton"):
        synthetic_datasets({**opts, "rotaton": 3}, pre3)
    with pytest.raises(InputError, match="data.shape"):
        synthetic_datasets(opts, Preprocessor(NetworkGrid()))
