"""DeepFlow (Weinzaepfel et al. 2013): deep matching + variational flow on real 2D slices.

Pairs are ANTs' real brain slices (``ants2d``, 256×256) under a known large warp — a
translation of 15 % of the crop (≈ 14 px at 96×96), a rotation of up to ±10° and a smooth
field of up to 3 % — so the true flow is known: ``moving`` is a crop of the slice,
``fixed(x) = slice(p + x + u(x))``, hence ``fixed(x) = moving(x + u(x))``. DeepFlow has no
learned weights: nothing is trained, the solver runs on each pair. End-point errors are
counted where ``x + u(x)`` stays in the crop and the fixed image is not background.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from learnreg.cli.main import app
from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.data.random_warps import random_smooth_displacement
from learnreg.io.images import read_image
from learnreg.methods.base import RegistrationBatch
from learnreg.methods.registry import create_method, method_info
from learnreg.spatial.deep_matching import deep_matching
from learnreg.spatial.sampling import sample_index, warp
from learnreg.spatial.variational_flow import VariationalFlowConfig, variational_flow

from ._roundtrip import _sitk_replay, invoke, oblique, write

SIZE = 96
FAST = {"eta": 0.8}  # a coarser pyramid than the paper's 0.95, for test time


def known_warp(data_root, name: str, seed: int, size: int = SIZE, shift: float = 0.15):
    """``(fixed, moving, u, valid)``: a real slice under a random large known warp."""
    src = read_image(data_root / "ants2d" / f"{name}slice.jpg").data[None].double() / 255.0
    src = F.interpolate(src, scale_factor=size / 128, mode="area")  # 128-px crops → size
    g = torch.Generator().manual_seed(seed)
    s = src.shape[-1]
    p = (s - size) // 2
    angle = math.radians(float(torch.empty(1).uniform_(-10, 10, generator=g)))
    t = torch.empty(2, dtype=torch.float64).uniform_(-1, 1, generator=g)
    t = t / t.norm() * size * shift
    idx = torch.stack(torch.meshgrid(*[torch.arange(size)] * 2, indexing="ij")).double()
    c = (size - 1) / 2
    rot = torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
        dtype=torch.float64,
    )
    u = torch.einsum("ij,jhw->ihw", rot, idx - c) + c + t.view(2, 1, 1) - idx
    u = u + random_smooth_displacement((size, size), [size // 4], [size * 0.03], g)
    fixed = sample_index(src, (idx + u + p).permute(1, 2, 0)[None]).float()
    moving = src[..., p : p + size, p : p + size].float()
    inside = ((idx + u) >= 0).all(0) & ((idx + u) <= size - 1).all(0)
    return fixed, moving, u.float()[None], inside & (fixed[0, 0] > 0.05)


def epe(w: torch.Tensor, u: torch.Tensor, valid: torch.Tensor) -> float:
    return float((w - u).norm(dim=1)[0][valid].mean())


# ---------------------------------------------------------------------------- registry, inputs
def test_registered_and_listed() -> None:
    info = method_info("deepflow")
    assert info.year == 2013 and info.ndim == "2D" and "optical flow" in info.transform
    assert method_info("weinzaepfel2013").name == "deepflow"
    assert not info.cls.learned and not list(create_method("deepflow").parameters())
    out = CliRunner().invoke(app, ["methods"], terminal_width=250)
    assert out.exit_code == 0 and "deepflow" in out.output


def test_bad_inputs_raise_clear_errors() -> None:
    m = create_method("deepflow")
    with pytest.raises(InputError, match="2D images"):
        m(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16))
    with pytest.raises(InputError, match="one shape"):
        m(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 40))
    with pytest.raises(InputError, match="too small"):
        m(torch.rand(1, 1, 4, 32), torch.rand(1, 1, 4, 32))
    for bad in ({"ndim": 3}, {"levels": 0}, {"eta": 1.0}, {"omega": 2.5}, {"beta": -1}):
        with pytest.raises(ValueError):
            create_method("deepflow", **bad)
    with pytest.raises(InputError, match="same shape"):
        deep_matching(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 16))
    from learnreg.api.registration import choose_model

    vol = Image(torch.rand(1, 16, 16, 16), Grid((16, 16, 16)), "vol")
    with pytest.raises(InputError, match="registers 2D images; vol is 3D"):
        choose_model(vol, vol, method="deepflow")


def test_variational_flow_recovers_a_small_translation_in_2d_and_3d() -> None:
    """Sub-pixel accuracy without matches where the linearization holds (smooth images)."""
    g = torch.Generator().manual_seed(0)
    for shape, shift in (((48, 48), (1.5, -1.0)), ((24, 24, 24), (1.0, -0.5, 0.75))):
        moving = torch.rand(1, 1, *shape, generator=g)
        from learnreg.spatial.filters import gaussian_blur

        moving = gaussian_blur(moving, 2.0)
        moving = (moving - moving.min()) / (moving.max() - moving.min())
        u = torch.tensor(shift).view(1, -1, *[1] * len(shape)).expand(1, -1, *shape)
        fixed = warp(moving, u.contiguous())
        w = variational_flow(fixed, moving, VariationalFlowConfig(beta=0, eta=0.7, min_size=12))
        inner = (slice(None), slice(None), *[slice(4, -4)] * len(shape))
        err = (w - u)[inner].norm(dim=1).mean()
        assert float(err) < 0.15, (shape, float(err))


# ---------------------------------------------------------------------------- real data
def test_deep_matching_finds_large_displacements(data_root) -> None:
    """Most atomic patches are matched to within 3 px of the known ≈ 14 px motion."""
    fixed, moving, u, _ = known_warp(data_root, "r62", 0)
    mt = deep_matching(fixed, moving)
    at = mt.fixed.round().long()
    true = u[0][:, at[:, 0], at[:, 1]].T
    err = (mt.displacements - true).norm(dim=1)
    assert len(mt) > 0.5 * (SIZE // 4) ** 2
    assert float((err < 3).float().mean()) > 0.8 and float(err.median()) < 1.5


# Measured (96×96, eta 0.8, r16 and r85, warp seeds 0/1/2; mean of the two pairs), EPE px:
# identity 13.90/15.54/14.20, variational flow without matches 8.72/12.65/10.90, DeepFlow
# 0.141/0.448/0.325 — at most 0.029 of the identity and 0.035 of the flow without matches.
@pytest.mark.parametrize("seed", [0])
def test_deepflow_recovers_large_warps_and_matching_helps(data_root, seed) -> None:
    with_m = create_method("deepflow", **FAST)
    without = create_method("deepflow", matching=False, **FAST)
    rows = []
    for name in ("r16", "r85"):
        fixed, moving, u, valid = known_warp(data_root, name, seed)
        batch = RegistrationBatch(fixed, moving, target=u)
        out = with_m.predict(fixed, moving)
        plain = without.predict(fixed, moving)
        rows.append(
            (epe(torch.zeros_like(u), u, valid), epe(plain.displacement, u, valid),
             epe(out.displacement, u, valid))
        )  # fmt: skip
        assert float(with_m.transform_error(batch, out)[0]) < 0.25 * float(u.norm(dim=1).mean())
    identity, plain, deep = (np.mean(c) for c in zip(*rows, strict=True))
    assert deep < 0.15 * identity, rows
    assert deep < 0.25 * plain, rows


def test_register_method_deepflow_writes_replayable_files(data_root, tmp_path) -> None:
    """``learnreg register --method deepflow`` (no checkpoint) on oblique 2D images at other
    spacings; SimpleITK replays the written warp; the warp brings the moving image closer."""
    src = read_image(data_root / "ants2d" / "r16slice.jpg")
    small = Image(
        F.interpolate(src.data[None, :, 32:224, 32:224], size=(64, 64), mode="area")[0],
        Grid((64, 64), (3.0, 3.0)),
        "s",
    )
    fixed = oblique(small, (2.8, 3.3), 10.0, "f")
    shifted = Image(torch.roll(small.data, (4, -3), dims=(1, 2)), small.grid, "m")
    moving = oblique(shifted, (3.2, 2.9), -8.0, "m")
    fp, mp = write(fixed, tmp_path / "fixed.nii.gz"), write(moving, tmp_path / "moving.nii.gz")
    out = tmp_path / "out"
    text = invoke("register", fp, mp, "-o", out, "--method", "deepflow")
    assert "deepflow" in text and "no learned weights" in text
    manifest = json.loads((out / "result.json").read_text())
    assert "warp" in manifest["files"]
    import nibabel as nib

    ours = np.asarray(nib.load(str(out / "warped.nii.gz")).get_fdata())
    ref = _sitk_replay(out, fp, mp)
    span = float(moving.data.max() - moving.data.min())
    assert np.abs(ours.reshape(ref.shape) - ref).mean() / span < 0.01
    from learnreg.spatial.sampling import resample

    before = resample(moving, fixed.grid).data[0].numpy()
    f = fixed.data[0].numpy()
    assert np.abs(ours.reshape(f.shape) - f).mean() < 0.6 * np.abs(before - f).mean()


def test_train_is_refused_cleanly(tmp_path) -> None:
    path = tmp_path / "train.yaml"
    data = {"shape": [64, 64], "synthetic": {"kind": "warp", "transform": "dense"}}
    path.write_text(yaml.safe_dump({"method": "deepflow", "progress": False, "data": data}))
    result = CliRunner().invoke(app, ["train", str(path), "-o", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert isinstance(result.exception, InputError)
    assert "no learned weights" in str(result.exception)
