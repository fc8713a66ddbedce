"""RegNet (Sokooti et al. 2017): multi-scale patch network on simulated smooth fields of real
images (2D slices for the fast test, LPBA40 volumes for the slow one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from learnreg.data.datasets import collate_pairs
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.data.random_warps import warp_source
from learnreg.methods.base import RegistrationBatch
from learnreg.methods.flownet import endpoint_error
from learnreg.methods.registry import create_method, method_info
from learnreg.methods.regnet import (
    CONTEXT,
    PATCH,
    PatchPredictions,
    RegNet,
    RegNetwork,
    extract_patches,
)

WARPS = {
    "transform": "dense",
    "rotation": 10,
    "translation": 3,
    "scale": 0.1,
    "shear": 0.05,
    "field_magnitudes": [2, 1],
}


def _randomize_batch_norms(net: torch.nn.Module, seed: int = 0) -> None:
    """Random running statistics and affine parameters, so an untrained network in eval mode
    gives outputs that vary with the input (a meaningful equality check)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm3d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.05)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def test_registered_with_table_attributes() -> None:
    info = method_info("sokooti")
    assert info.name == "regnet" and info.cls is RegNet and info.year == 2017
    assert "supervised" in info.supervision and "dense displacement" in info.transform


def test_patch_network_has_the_papers_sizes() -> None:
    """Width 1 on 29³ / 27³ patches: 1³ output of 3 values; the layer widths of the paper."""
    net = RegNetwork(3, 1.0)
    out = net(*(torch.rand(2, 1, PATCH, PATCH, PATCH),) * 2, *(torch.rand(2, 1, 27, 27, 27),) * 2)
    assert out.shape == (2, 3, 1, 1, 1)
    convs = [m.out_channels for m in net.merge.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs == [60, 70, 75, 150]
    assert len(net.streams) == 2 and len(RegNetwork(3, 1.0, shared_weights=False).streams) == 4


def test_extract_patches_against_numpy_indexing() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 30, 31, 33, generator=g, dtype=torch.float64)
    centres = torch.tensor([[[0, 5, 32], [15, 15, 16]], [[29, 30, 0], [3, 20, 9]]])
    padded = np.pad(image.numpy(), [(0, 0), (0, 0)] + [(26, 26)] * 3)
    for size, step, r in ((PATCH, 1, 14), (CONTEXT, 2, 26)):
        got = extract_patches(image, centres, size, step).numpy()
        for i in range(2):
            for k, c in enumerate(centres[i].tolist()):
                sl = tuple(slice(v + 26 - r, v + 26 + r + 1, step) for v in c)
                np.testing.assert_array_equal(got[2 * i + k], padded[(i, slice(None), *sl)])
    with pytest.raises(ValueError, match="inside"):
        extract_patches(image, torch.tensor([[[30, 0, 0]]]), PATCH)


@pytest.mark.parametrize("coord_conv", [False, True])
@pytest.mark.parametrize("ndim,shape", [(2, (40, 37)), (3, (20, 23, 18))])
def test_dense_prediction_equals_patch_by_patch(ndim, shape, coord_conv) -> None:
    """The whole-image (sliding, stride 2) prediction equals the patch network applied to
    extracted patches at those voxels (with CoordConv: given their positions in the image),
    and is a field on the stride-2 grid."""
    m = RegNet(ndim=ndim, width=0.25, coord_conv=coord_conv)
    _randomize_batch_norms(m)
    m.eval()
    g = torch.Generator().manual_seed(1)
    fixed, moving = torch.rand(2, 1, *shape, generator=g), torch.rand(2, 1, *shape, generator=g)
    out = m(fixed, moving)
    assert out.displacement.shape == (2, ndim, *shape)
    assert out.transform.grid.shape == tuple((s + 2) // 2 for s in shape)
    assert out.transform.grid.spacing == (2.0,) * ndim
    dense = out.transform.voxel_field() * 2  # input voxels at voxels 0, 2, 4, ...
    centres = torch.tensor([[0] * ndim, [2 * ((s - 1) // 2) for s in shape], [4, 6, 2][:ndim]])
    with torch.no_grad():
        patchwise = m.predict_at(fixed, moving, centres.expand(2, -1, -1))
    for k, c in enumerate(centres.tolist()):
        at = dense[(slice(None), slice(None), *[v // 2 for v in c])]
        torch.testing.assert_close(patchwise[:, k], at, atol=1e-5, rtol=1e-4)
    assert float(patchwise.std(1).mean()) > 1e-4  # the outputs vary: the check means something
    # odd-index voxels: linear interpolation of their neighbours
    mid = out.displacement[(slice(None), slice(None), 1, *[0] * (ndim - 1))]
    lo = dense[(slice(None), slice(None), 0, *[0] * (ndim - 1))]
    hi = dense[(slice(None), slice(None), 1, *[0] * (ndim - 1))]
    torch.testing.assert_close(mid, (lo + hi) / 2, atol=1e-5, rtol=1e-4)


def test_training_forward_samples_foreground_patches_and_the_loss_reads_the_target() -> None:
    m = RegNet(ndim=2, width=0.25, patches_per_pair=5)
    fixed = torch.zeros(2, 1, 32, 32)
    fixed[:, :, 8:20, 10:24] = 1.0
    out = m(fixed, fixed.clone())
    assert isinstance(out, PatchPredictions) and out.centres.shape == (2, 5, 2)
    c = out.centres
    assert bool(((c[..., 0] >= 8) & (c[..., 0] < 20) & (c[..., 1] >= 10) & (c[..., 1] < 24)).all())
    target = torch.randn(2, 2, 32, 32)
    terms = m.loss(RegistrationBatch(fixed, fixed, target=target), out)
    true = torch.stack([target[i, :, c[i, :, 0], c[i, :, 1]].T for i in range(2)])
    want = (out.displacement - true).norm(dim=-1).mean()
    torch.testing.assert_close(terms["total"], want)
    terms["total"].backward()
    with pytest.raises(ValueError, match="dense displacement"):
        m.loss(RegistrationBatch(fixed, fixed), out)


def test_bad_inputs_raise_value_error() -> None:
    for bad in ({"ndim": 4}, {"width": 0}, {"patches_per_pair": 0}, {"foreground": 1.0}):
        with pytest.raises(ValueError):
            create_method("regnet", **bad)
    m = create_method("regnet", ndim=3, width=0.25)
    with pytest.raises(ValueError, match="spatial"):
        m(torch.rand(1, 1, 30, 30), torch.rand(1, 1, 30, 30))


# ---------------------------------------------------------------------------- training on real data
def _train(method, train, steps, lr=1e-3, batch=4):
    opt = torch.optim.Adam(method.parameters(), lr=lr)
    method.train()
    for step, b in enumerate(DataLoader(train, batch_size=batch, collate_fn=collate_pairs)):
        if step == steps:
            break
        terms = method.loss(b, method(b.fixed, b.moving))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    return method.eval()


def _epe(method, val) -> tuple[float, float]:
    b = collate_pairs([val[i] for i in range(len(val))])
    with torch.no_grad():
        out = method(b.fixed, b.moving, b.grid)
    inner = (slice(None), slice(None), *[slice(4, -4)] * method.ndim)  # away from the border
    identity = endpoint_error(torch.zeros_like(b.target[inner]), b.target[inner]).mean()
    return float(identity), float(endpoint_error(out.displacement[inner], b.target[inner]).mean())


# Measured (width 0.25, 750 Adam steps at 1e-3 of 4 pairs × 16 patches; 64 validation pairs of
# unseen images, whole image, identity EPE 3.53 px): 0.72, 0.83, 0.81 of the identity (seeds 0-2;
# 300 steps: no progress yet); untrained 1.00.
BOUND_2D = 0.9


@pytest.mark.slow  # about 50 s on one thread: patch training needs 750 steps to show
def test_trains_below_the_identity_on_unseen_slices() -> None:
    options = {**WARPS, "images": "both", "length": 10**6, "val_length": 24}
    train, val = warp_source(options, Preprocessor(NetworkGrid((64, 64)), percentiles=None))
    m = RegNet(ndim=2, width=0.25)
    identity, before = _epe(m.eval(), val)
    _train(m, train, 750)
    _, after = _epe(m, val)
    print(f"regnet 2D: EPE {identity:.3f} (identity) -> {after:.3f} px, untrained {before:.3f}")
    assert before > 0.95 * identity
    assert after < BOUND_2D * identity, f"EPE {after:.3f} vs identity {identity:.3f} px"


# ---------------------------------------------------------------------------- issue 11 proof
def test_train_then_register_oblique_pair_replays_in_simpleitk(data_root, tmp_path):
    """`learnreg train` a tiny RegNet on simulated smooth fields of LPBA40 at 8 mm (its RAS
    grid), `learnreg register --model` a pair of volumes at another spacing and an oblique
    direction; the dense prediction is written as a field that SimpleITK replays."""
    from learnreg.io.images import read_image
    from learnreg.train.checkpoint import load_checkpoint

    from ._roundtrip import lpba_pairs_config, oblique, register_and_replay, train

    config = lpba_pairs_config(
        "regnet", {"ndim": 3, "width": 0.125, "patches_per_pair": 4}, [20, 24, 20]
    )
    config["data"]["synthetic"].update(WARPS)  # RegNet is supervised by these warps
    ckpt = train(config, tmp_path / "train")
    extra = load_checkpoint(ckpt)["extra"]
    assert extra["preprocess"]["network"]["shape"] == [20, 24, 20]
    assert extra["best_key"] == "error"  # validated by the dense end-point error
    lpba = data_root / "lpba40" / "images"
    fixed = oblique(read_image(lpba / "S35.nii.gz"), (6.0, 7.0, 5.0), 15.0, "f")
    moving = oblique(read_image(lpba / "S36.nii.gz"), (5.0, 6.5, 7.5), -10.0, "m")
    report = register_and_replay(ckpt, fixed, moving, tmp_path / "out")
    assert report["manifest"]["info"]["transform"] == "DisplacementField"
    assert report["max_warp_mm"] > 0.01  # a predicted field, not the identity
