"""``learnreg train`` registered on a Typer app, training a tiny VoxelMorph."""

from __future__ import annotations

import typer
import yaml
from typer.testing import CliRunner

from learnreg.cli.train import register_command

from .conftest import TINY_VXM


def test_train_command(ants2d, tmp_path):
    app = typer.Typer()
    register_command(app)

    @app.command("noop")
    def noop() -> None:  # a second command, so "train" is a subcommand as in learnreg
        pass

    cfg = {
        "method": "voxelmorph",
        "method_config": TINY_VXM,
        "data": {
            "images": "images",
            "labels": "labels",
            "atlas": "r16slice",
            "shape": [32, 32],
            "levels": 2,
            "val": ["r85slice"],
        },
        "steps": 3,
        "val_every": 3,
        "progress": False,
        "device": "cpu",
    }
    path = ants2d / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = CliRunner().invoke(
        app, ["train", str(path), "--set", "steps=2", "--set", "val_every=1", "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # the console wraps long paths anywhere
    assert "trained 2 steps" in said and "best validation dice" in said
    assert (out / "checkpoints" / "last.pt").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method_config"]["enc_features"] == [8, 16]
    r = CliRunner().invoke(
        app, ["train", str(path), "--set", "steps=3", "--resume", "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "trained 3 steps" in r.output
    bad = CliRunner().invoke(app, ["train", str(path), "--set", "optimizer.foo=1"])
    assert bad.exit_code != 0 and "valid keys" in str(bad.exception)
