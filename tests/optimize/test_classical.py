"""Classical registration on real data improves alignment over identity / affine baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.eval.metrics import jacobian_stats, mean_dice
from learnreg.io.images import read_image, read_labels
from learnreg.losses.functional import lncc
from learnreg.optimize.classical import register
from learnreg.optimize.config import ClassicalConfig, DeformableStage, LinearStage, preset
from learnreg.optimize.pyramid import downsample
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.sampling import resample


def _slice(path) -> Image:
    im = read_image(path)
    return Image(im.data.float() / 255.0, im.grid, im.name)


def _lpba_small(lpba, subject: str, factor: float = 3.0) -> tuple[Image, Image]:
    """Image and label map of a subject, downsampled ~3× (53×64×53)."""
    img = downsample(read_image(lpba / f"images/{subject}.nii.gz"), factor)
    lab = read_labels(lpba / f"labels/{subject}.nii.gz")
    return img, resample(lab, img.grid, mode="label")


def test_affine_preset_recovers_known_affine_2d(data_root):
    fixed = _slice(data_root / "ants2d/r16slice.jpg")
    a = math.radians(6.0)
    m = torch.eye(3)
    m[:2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) * 1.05
    centre = fixed.grid.index_to_world(torch.tensor([127.5, 127.5], dtype=torch.float64)).float()
    m[:2, 2] = centre - m[:2, :2] @ centre + torch.tensor([4.0, -3.0])
    truth = AffineTransform(m)
    # moving(y) = fixed(S(y)): registration must find S⁻¹
    moving = resample(fixed, fixed.grid, truth)
    result = register(fixed, moving, "affine")
    pts = fixed.grid.world_points()[64:192:16, 64:192:16].reshape(-1, 2)
    err = (truth(result.map_points(pts)[None])[0] - pts).norm(dim=-1)
    assert err.mean() < 0.5, f"mean recovery error {err.mean():.2f} mm"


def test_default_registration_2d_real_pair(data_root):
    fixed = _slice(data_root / "ants2d/r16slice.jpg")
    moving = _slice(data_root / "ants2d/r64slice.jpg")
    affine_only = register(fixed, moving, "affine")
    result = register(fixed, moving, "default")
    f = fixed.batch()
    before = float(lncc(f, affine_only.warp(moving).batch(), window=9))
    after = float(lncc(f, result.warp(moving).batch(), window=9))
    assert after < before - 0.05, (before, after)  # lower loss = higher local correlation
    stats = jacobian_stats(result.deformable.voxel_field())
    assert stats["folding_fraction"] == 0.0


def test_default_registration_3d_lpba_improves_dice(lpba):
    fixed, fixed_lab = _lpba_small(lpba, "S01")
    moving, moving_lab = _lpba_small(lpba, "S35")
    # images are already 3x coarser: use the default's full-resolution levels, rescaled
    cfg = preset("default")
    cfg.deformable.shrink, cfg.deformable.velocity_shrink = (2, 1), (2, 2)
    result = register(fixed, moving, cfg)
    identity = mean_dice(fixed_lab.data[0], moving_lab.data[0])
    affine = mean_dice(
        fixed_lab.data[0], resample(moving_lab, fixed.grid, result.affine, mode="label").data[0]
    )
    final = mean_dice(fixed_lab.data[0], result.warp(moving_lab, mode="label").data[0])
    assert final > affine + 0.05 and final > identity + 0.05, (identity, affine, final)
    assert jacobian_stats(result.deformable.voxel_field())["folding_fraction"] == 0.0
    # the inverse field undoes the forward one (inverse consistency of the SVF)
    pts = fixed.grid.world_points()[10:40:5, 10:50:5, 10:40:5].reshape(-1, 3)
    back = result.map_points(result.map_points(pts), inverse=True)
    assert (back - pts).norm(dim=-1).mean() < 0.3


def test_registration_works_across_grids_and_orientations(lpba):
    """Moving on an oblique, anisotropic grid: physical space must be respected."""
    fixed, _ = _lpba_small(lpba, "S01", 4.0)
    c, s = math.cos(0.3), math.sin(0.3)
    g = fixed.grid
    oblique = Grid(
        (36, 40, 30), (1.3 * 4, 1.1 * 4, 1.5 * 4), g.origin, ((c, -s, 0), (s, c, 0), (0, 0, 1))
    )
    centre = g.index_to_world(torch.tensor([(n - 1) / 2 for n in g.shape], dtype=torch.float64))
    ocentre = oblique.index_to_world(
        torch.tensor([(n - 1) / 2 for n in oblique.shape], dtype=torch.float64)
    )
    oblique = Grid(
        oblique.shape,
        oblique.spacing,
        tuple(np.asarray(g.origin) + (centre - ocentre).numpy()),
        oblique.direction,
    )
    moving = resample(fixed, oblique)  # same anatomy, other grid: the answer is identity
    result = register(fixed, moving, "affine")
    pts = g.world_points()[5:35:5, 5:40:5, 5:35:5].reshape(-1, 3)
    err = (result.map_points(pts) - pts).norm(dim=-1)
    assert err.mean() < 1.5, f"{err.mean():.2f} mm off identity"


def test_config_validation_and_yaml_roundtrip():
    cfg = preset("default")
    again = ClassicalConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="metric"):
        ClassicalConfig(linear=[LinearStage(metric="bogus")]).validate()
    with pytest.raises(ValueError, match="unknown"):
        ClassicalConfig.from_dict({"linaer": []})
    with pytest.raises(ValueError, match="shrink"):
        ClassicalConfig(deformable=DeformableStage(shrink=(4, 2), iterations=(1,))).validate()
    with pytest.raises(ValueError, match="preset"):
        preset("fast-and-wrong")


def test_bad_pairs_raise_input_error(data_root):
    img2d = _slice(data_root / "ants2d/r16slice.jpg")
    img3d = Image(torch.rand(1, 8, 8, 8), Grid((8, 8, 8)), "vol.nii.gz")
    with pytest.raises(InputError, match="vol.nii.gz"):
        register(img2d, img3d)
    const = Image(torch.ones(1, 32, 32), Grid((32, 32)), "flat.png")
    with pytest.raises(InputError, match="flat.png.*constant"):
        register(img2d, const)
    nan = img2d.data.clone()
    nan[0, 3, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        register(Image(nan, img2d.grid, "nan.png"), img2d)


def test_multimodal_preset_registers_inverted_contrast(data_root):
    """MI-driven preset aligns a T1 slice to another subject's slice with inverted contrast."""
    fixed = downsample(_slice(data_root / "ants2d/r16slice.jpg"), 2)
    moving_t1 = downsample(_slice(data_root / "ants2d/r64slice.jpg"), 2)
    tissue = lambda im: im.with_data(  # noqa: E731 - three intensity classes as labels
        (im.data > 0.25).long() + (im.data > 0.55).long()
    )
    inverted = moving_t1.with_data(torch.where(moving_t1.data > 0.05, 1.1 - moving_t1.data, 0.0))
    result = register(fixed, inverted, "multimodal")
    fixed_lab, moving_lab = tissue(fixed).data[0], tissue(moving_t1)
    affine = mean_dice(fixed_lab, resample(moving_lab, fixed.grid, result.affine, "label").data[0])
    final = mean_dice(fixed_lab, result.warp(moving_lab, mode="label").data[0])
    identity = mean_dice(fixed_lab, moving_lab.data[0])
    assert final > affine + 0.03 and final > identity + 0.05, (identity, affine, final)
    assert jacobian_stats(result.deformable.voxel_field())["folding_fraction"] == 0.0
