"""Method registry: Table-1 attributes, creation by name, config validation."""

from __future__ import annotations

import pytest
import torch

from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import (
    available_methods,
    create_method,
    method_config_keys,
    method_info,
    register_method,
)
from learnreg.methods.voxelmorph import VoxelMorph, VoxelMorphDiff, VoxelMorphWeakly
from learnreg.spatial.displacement import DisplacementField

SMALL = {"enc_features": (4, 8), "dec_features": (8, 8, 4)}


def test_available_methods_lists_voxelmorph_family_with_attributes():
    infos = {m.name: m for m in available_methods()}
    assert {"voxelmorph", "voxelmorph-diff", "voxelmorph-weakly"} <= set(infos)
    vxm = infos["voxelmorph"]
    assert (vxm.year, vxm.ndim, vxm.supervision) == (2018, "2D/3D", "unsupervised")
    assert "Balakrishnan" in vxm.reference and "diffusion" in vxm.loss
    assert infos["voxelmorph-diff"].cls is VoxelMorphDiff
    assert "weakly" in infos["voxelmorph-weakly"].supervision
    assert VoxelMorph.name == "voxelmorph" and VoxelMorphWeakly.name == "voxelmorph-weakly"
    assert vxm.description.startswith("VoxelMorph")


def test_create_method_by_name_alias_and_config():
    m = create_method("VoxelMorph", ndim=2, **SMALL)
    assert isinstance(m, VoxelMorph) and m.name == "voxelmorph"
    assert m.config["reg_weight"] == 1.0  # resolved default for LNCC
    assert create_method("vxm", ndim=2, similarity="mse", **SMALL).config["reg_weight"] == 0.01
    m2 = create_method("voxelmorph", ndim=2, **{"lambda": 0.5}, **SMALL)
    assert m2.reg_weight == 0.5 and m2.config["reg_weight"] == 0.5 and "lambda" not in m2.config
    assert isinstance(create_method("vxm_diff", ndim=2, **SMALL), VoxelMorphDiff)
    # the saved config rebuilds the same architecture
    clone = type(m2)(**m2.config)
    assert clone.config == m2.config
    clone.load_state_dict(m2.state_dict())


def test_config_of_subclass_is_its_own_signature():
    m = create_method("voxelmorph-diff", ndim=2, prior_lambda=5.0, **SMALL)
    assert m.config["prior_lambda"] == 5.0 and m.config["int_downsize"] == 2
    assert "similarity" not in m.config and set(m.config) == set(
        method_config_keys("voxelmorph-diff")
    )


def test_unknown_name_or_key_lists_valid_ones():
    with pytest.raises(ValueError, match="valid methods: .*voxelmorph"):
        create_method("voxelmorf")
    with pytest.raises(ValueError, match="did you mean 'voxelmorph'"):
        method_info("voxelmorf")
    with pytest.raises(
        ValueError, match=r"unknown config key\(s\) \['windw'\]; valid keys: .*window"
    ):
        create_method("voxelmorph", windw=5)
    with pytest.raises(ValueError, match="similarity must be one of"):
        create_method("voxelmorph", ndim=2, similarity="mi", **SMALL)
    with pytest.raises(ValueError, match="not both"):
        create_method("voxelmorph", reg_weight=1.0, **{"lambda": 2.0})


def test_register_method_rejects_duplicates_and_non_methods():
    with pytest.raises(ValueError, match="already registered"):
        register_method(
            "vxm", year=2018, ndim="2D", transform="", loss="", supervision="", reference=""
        )(VoxelMorph)
    with pytest.raises(TypeError):
        register_method(
            "not-a-method",
            year=2000,
            ndim="2D",
            transform="",
            loss="",
            supervision="",
            reference="",
        )(dict)


def test_batch_and_output_move_and_default_predict():
    class Shift(RegistrationMethod):
        def __init__(self, amount: float = 1.0) -> None:
            super().__init__()
            self.amount = torch.nn.Parameter(torch.tensor(amount))
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, fixed, moving, grid=None):
            grid = unit_grid(fixed) if grid is None else grid
            u = self.drop(torch.ones(fixed.shape[0], 2, *fixed.shape[2:])) * self.amount
            return MethodOutput(DisplacementField(grid, u), grid, moving, {"a": {"b": u}})

        def loss(self, batch, output):
            return {"total": output.displacement.mean()}

    m = Shift(2.0)
    assert m.config == {"amount": 2.0}
    b = RegistrationBatch(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)).to("cpu")
    assert b.fixed_labels is None
    m.train()
    out = m.predict(b.fixed, b.moving)  # eval mode: no dropout, no grad, mode restored
    assert m.training and not out.displacement.requires_grad
    assert torch.all(out.displacement == 2.0)
    assert out.extras["a"]["b"].shape == (1, 2, 4, 4) and out.warped.shape == (1, 1, 4, 4)
    assert out.grid == unit_grid(b.fixed)


NO_COORD_CONV = {
    # its attribute vectors are matched between positions of the two images: coordinates in
    # them would pull every match toward the same position, not give an encoder a sense of place
    "wu-features": "patch codes matched across positions (HAMMER-like)",
}


def test_every_learned_method_offers_coord_conv():
    """CoordConv (Liu et al. 2018) is an option of every encoder: each registered method
    accepts ``coord_conv``, is unchanged without it and gains CoordConv layers with it."""
    for info in available_methods():
        if not info.cls.learned or info.name in NO_COORD_CONV:  # no encoder of the pair
            continue
        keys = method_config_keys(info.name)
        assert "coord_conv" in keys, f"{info.name} has no coord_conv option"
        assert keys["coord_conv"] is False, info.name

        def count(m) -> int:
            return sum(type(mod).__name__ == "CoordConv" for mod in m.modules())

        kw: dict = {"ndim": 2} if "ndim" in keys else {}
        if "shape" in keys:
            kw["shape"] = (64, 64)
        plain, cc = create_method(info.name, **kw), create_method(info.name, coord_conv=True, **kw)
        assert count(plain) == 0, info.name
        if any(isinstance(mod, torch.nn.modules.conv._ConvNd) for mod in plain.modules()):
            assert count(cc) >= 1, info.name
        else:  # no convolution (Sergeev's per-landmark MLPs): coordinates join the inputs
            assert sum(p.numel() for p in cc.parameters()) > sum(
                p.numel() for p in plain.parameters()
            ), info.name
