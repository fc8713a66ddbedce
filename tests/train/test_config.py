"""TrainConfig: YAML, overrides, validation with helpful errors."""

from __future__ import annotations

import pytest

from learnreg.core.errors import InputError
from learnreg.train.config import TrainConfig, parse_override

YAML = """
method: voxelmorph
method_config: {ndim: 3, enc_features: [8, 16]}
data:
  images: imgs
  labels: labs
  atlas: S01
  train: [S11, S12]
  val: [S35]
  shape: [40, 48, 40]
  levels: 3
  augment: {rotation: 5, elastic: 1.0}
optimizer: {lr: 1.0e-3}
steps: 20
"""


def test_from_yaml_with_overrides(tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text(YAML)
    cfg = TrainConfig.from_yaml(
        p, ["optimizer.lr=2e-4", "data.augment.scale=0.1", "steps=7", "method_config.ndim=2"]
    )
    assert cfg.method == "voxelmorph" and cfg.method_config == {"ndim": 2, "enc_features": [8, 16]}
    assert cfg.optimizer.lr == 2e-4 and cfg.steps == 7
    assert cfg.data.augment.rotation == 5 and cfg.data.augment.scale == 0.1
    assert cfg.data.images == str(tmp_path / "imgs")  # relative to the YAML file
    assert cfg.data.shape == [40, 48, 40]
    d = cfg.to_dict()
    assert TrainConfig.from_dict(d) == cfg  # round trip through plain types
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optimizer.lrr=1", r"unknown config key optimizer.lrr in optimizer; valid keys: name, lr"),
        ("bogus=1", r"unknown config key bogus in top level; valid keys: method, method_config"),
        ("data.augment.rotate=3", r"data.augment.rotate .*valid keys: rotation, scale"),
        ("steps=many", r"steps must be an integer"),
        ("steps=0", r"steps must be >= 1"),
        ("optimizer.name=lbfgs", r"optimizer.name must be one of"),
        ("optimizer.schedule=step", r"optimizer.schedule must be one of"),
        ("optimizer.min_lr=1", r"optimizer.min_lr must be in \[0, lr"),
        ("data.augment.rotation=-2", r"augment.rotation must be >= 0"),
        ("optimizer.groups={model: {every: 0}}", r"groups.model.every must be an integer >= 1"),
        ("optimizer.groups={model: {every: 1.5}}", r"groups.model.every must be an integer"),
        ("optimizer.groups={model: {beta: 1}}", r"groups.model must map lr, weight_decay"),
    ],
)
def test_errors_name_the_key(tmp_path, override, match):
    p = tmp_path / "train.yaml"
    p.write_text(YAML)
    with pytest.raises(InputError, match=match) as e:
        TrainConfig.from_yaml(p, [override])
    assert str(e.value).startswith(str(p))


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "none.yaml")
    p = tmp_path / "x.yaml"
    p.write_text("data: {images: a}\n")
    with pytest.raises(InputError, match="missing required config key method"):
        TrainConfig.from_yaml(p)


def test_group_update_ratio() -> None:
    """``every: k`` steps a group on training steps k, 2k, ... (1-based)."""
    from learnreg.train.config import OptimizerConfig

    o = OptimizerConfig(groups={"model": {"every": 3}}).validate()
    assert [s for s in range(1, 10) if o.steps_on("model", s)] == [3, 6, 9]
    assert all(o.steps_on("discriminator", s) for s in range(1, 10))
