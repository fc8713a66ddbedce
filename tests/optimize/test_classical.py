"""Classical registration on real data improves alignment over identity / affine baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import learnreg.losses as L
from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.io.images import read_image, read_labels
from learnreg.losses.functional import lncc
from learnreg.metrics import jacobian_stats, mean_dice
from learnreg.optimize.classical import register
from learnreg.optimize.config import (
    ClassicalConfig,
    DeformableStage,
    LinearStage,
    preset,
    regularization_terms,
    similarity_terms,
)
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


# ---------------------------------------------------------------------------- losses by name
_CALLS: list[tuple[str, float]] = []


def _recording_mse(fixed, moving, mask=None, reduction="mean"):
    value = L.mse(fixed, moving, mask, reduction)
    _CALLS.append(("sim", value.item()))
    return value


def _recording_diffusion(field, spacing=None, reduction="mean"):
    value = L.diffusion(field, spacing, reduction)
    _CALLS.append(("reg", value.item()))
    return value


if "test_recording_mse" not in L.available_losses():

    @L.register_loss("test_recording_mse")
    class _RecordingMSE(L.FunctionalLoss):
        function = staticmethod(_recording_mse)
        kind = "similarity"

    @L.register_loss("test_recording_diffusion")
    class _RecordingDiffusion(L.FunctionalLoss):
        function = staticmethod(_recording_diffusion)
        kind = "regularizer"


def _rigid(metric) -> dict:
    return {"model": "rigid", "metric": metric, "shrink": [2], "iterations": [3]}


def test_presets_declare_their_terms_by_name():
    default, multimodal = preset("default"), preset("multimodal")
    assert [s.metric for s in default.linear] == ["ncc", "ncc"]
    assert default.deformable.metric == "lncc" and default.deformable.window == 5
    assert default.deformable.regularization == {"diffusion": 1.0}
    assert [s.metric for s in multimodal.linear] == ["mi", "mi"]
    assert multimodal.deformable.metric == "mi"
    assert multimodal.deformable.regularization == {"diffusion": 2.0}


def test_preset_terms_compute_the_functional_losses_exactly():
    """The registry terms of the presets are, bit for bit, the losses the presets always used
    (LNCC window 5, NCC, MI with the config's bins / samples, diffusion × smoothness)."""
    g = torch.Generator().manual_seed(0)
    f, m = torch.rand(1, 1, 20, 18, generator=g), torch.rand(1, 1, 20, 18, generator=g)
    v = torch.randn(1, 2, 10, 9, generator=g)
    default, multimodal = preset("default"), preset("multimodal")
    sim = similarity_terms(default.deformable, default)(f, m)["total"]
    assert torch.equal(sim, L.lncc(f, m, window=5))
    assert torch.equal(similarity_terms(default.linear[0], default)(f, m)["total"], L.ncc(f, m))
    assert torch.equal(regularization_terms(default.deformable)(v)["total"], L.diffusion(v))
    torch.manual_seed(1)
    mi = similarity_terms(multimodal.linear[1], multimodal)(f, m)["total"]
    torch.manual_seed(1)
    assert torch.equal(mi, L.mutual_information(f, m, bins=32, samples=32768))
    mi = similarity_terms(multimodal.deformable, multimodal)(f, m)["total"]
    assert torch.equal(mi, L.mutual_information(f, m, bins=32))
    reg = regularization_terms(multimodal.deformable)(v)["total"]
    assert torch.equal(reg, 2.0 * L.diffusion(v))


def test_metric_and_regularization_by_name_reach_the_optimizer(data_root):
    """A YAML config naming registry losses, weights and options is what the optimization
    loop evaluates."""
    fixed = downsample(_slice(data_root / "ants2d/r16slice.jpg"), 4)
    moving = downsample(_slice(data_root / "ants2d/r64slice.jpg"), 4)
    deformable = {
        "metric": {"test_recording_mse": {"weight": 2.0}},
        "regularization": {"test_recording_diffusion": 0.5},
        "shrink": [1],
        "velocity_shrink": [2],
        "iterations": [4],
    }
    cfg = ClassicalConfig.from_dict(
        {"linear": [_rigid("test_recording_mse")], "deformable": deformable}
    )
    losses: list[float] = []
    _CALLS.clear()
    result = register(fixed, moving, cfg, progress=lambda s, i, n, loss: losses.append(loss))
    assert [tag for tag, _ in _CALLS] == ["sim"] * 3 + ["sim", "reg"] * 4
    assert losses[:3] == pytest.approx([v for _, v in _CALLS[:3]])
    pairs = zip(_CALLS[3::2], _CALLS[4::2], strict=True)
    assert losses[3:] == pytest.approx([2.0 * s + 0.5 * r for (_, s), (_, r) in pairs])
    assert result.info["config"]["deformable"]["metric"] == deformable["metric"]
    # the same loss by another name optimizes identically; another metric does not
    run = lambda metric: register(  # noqa: E731
        fixed, moving, ClassicalConfig.from_dict({"linear": [_rigid(metric)], "deformable": None})
    ).affine.homogeneous()
    a, b, c = run("mse"), run({"test_recording_mse": {}}), run("ncc")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_config_options_and_legacy_keys():
    d = preset("default").to_dict()
    assert d["deformable"]["metric"] == "lncc" and "smoothness" not in d["deformable"]
    legacy = ClassicalConfig.from_dict(
        {"linear": [], "deformable": {"metric": "lncc", "window": 7, "smoothness": 3.0}}
    )
    assert legacy.deformable.regularization == {"diffusion": 3.0}
    assert similarity_terms(legacy.deformable, legacy)["lncc"].options == {"window": 7}
    spec = ClassicalConfig.from_dict(
        {"linear": [{"metric": {"mi": {"bins": 48}}}], "deformable": {"metric": {"lncc": {}}}}
    )
    assert similarity_terms(spec.linear[0], spec)["mi"].options == {"bins": 48, "samples": 32768}
    assert similarity_terms(spec.deformable, spec)["lncc"].options == {"window": 5}
    with pytest.raises(ValueError, match="not both"):
        DeformableStage(regularization={"bending": 1.0}, smoothness=2.0)
    with pytest.raises(
        ValueError,
        match=r"linear\[1\]\.metric: unknown loss 'lnc' \(did you mean 'lncc'.*valid similarity "
        r"losses: .*mse",
    ):
        ClassicalConfig.from_dict({"linear": [{}, {"metric": "lnc"}]})
    with pytest.raises(
        ValueError, match=r"deformable\.metric\.lncc: .*\['windw'\]; valid: .*'window'"
    ):
        ClassicalConfig.from_dict({"deformable": {"metric": {"lncc": {"windw": 3}}}})
    with pytest.raises(
        ValueError, match=r"deformable\.regularization: 'lncc' is a similarity loss"
    ):
        ClassicalConfig.from_dict({"deformable": {"regularization": {"lncc": 1.0}}})
    with pytest.raises(ValueError, match="deformable.metric: 'diffusion' is a regularizer loss"):
        ClassicalConfig.from_dict({"deformable": {"metric": "diffusion"}})
    with pytest.raises(ValueError, match="linear model must be one of .*'affine'"):
        ClassicalConfig(linear=[LinearStage("afine")]).validate()
    with pytest.raises(ValueError, match="unknown DeformableStage keys"):
        ClassicalConfig.from_dict({"deformable": {"smothness": 1.0}})


def _svf_only(iterations: int = 30, regularization: float = 1.0) -> ClassicalConfig:
    stage = DeformableStage(
        metric="mse",
        shrink=(2,),
        velocity_shrink=(4,),
        iterations=(iterations,),
        regularization={"diffusion": regularization},
    )
    return ClassicalConfig(linear=[], deformable=stage)


def test_multichannel_pair_is_compared_channel_by_channel(data_root):
    """A pair of two identical channels registers exactly as the single-channel pair (MSE is
    the mean over channels); channels must match; the result keeps the optimized velocity,
    whose exponential is the deformable part."""
    from learnreg.spatial.svf import StationaryVelocityField

    fixed = _slice(data_root / "ants2d/r16slice.jpg")
    moving = _slice(data_root / "ants2d/r64slice.jpg")
    one = register(fixed, moving, _svf_only())
    two = register(
        fixed.with_data(fixed.data.repeat(2, 1, 1)),
        moving.with_data(moving.data.repeat(2, 1, 1)),
        _svf_only(),
    )
    torch.testing.assert_close(
        two.deformable.voxel_field(), one.deformable.voxel_field(), atol=1e-4, rtol=1e-4
    )
    v = one.velocity
    assert isinstance(v, StationaryVelocityField) and v.grid.allclose(one.native_deformable.grid)
    torch.testing.assert_close(v.exp(), one.native_deformable.voxel_field(), atol=1e-5, rtol=0)
    assert float(v.velocity.abs().max()) > 0.1
    with pytest.raises(InputError, match="channels"):
        register(fixed.with_data(fixed.data.repeat(2, 1, 1)), moving, _svf_only())


def test_one_hot_label_maps_register_by_their_overlap(lpba):
    """Registering one-hot label maps (MSE, SVF only) raises their Dice: the reference
    velocities of SVF-Net (Rohé 2017) come from this."""
    _, fixed_lab = _lpba_small(lpba, "S01", 4.0)
    _, moving_lab = _lpba_small(lpba, "S35", 4.0)
    moving_lab = resample(moving_lab, fixed_lab.grid, mode="label")
    labels = [v for v in torch.unique(fixed_lab.data).tolist() if v]

    def one_hot(lab: Image) -> Image:
        x = torch.stack([(lab.data[0] == v).float() for v in [0, *labels]])
        return Image(x, lab.grid, lab.name)

    # measured: Dice 0.516 -> 0.651 (min det J 0.83)
    result = register(one_hot(fixed_lab), one_hot(moving_lab), _svf_only(100, 0.1))
    warped = result.warp(moving_lab, mode="label")
    before = mean_dice(fixed_lab.data, moving_lab.data, labels)
    after = mean_dice(fixed_lab.data, warped.data, labels)
    assert after > before + 0.1, (before, after)
    assert float(result.jacobian_determinant().min()) > 0
