"""``learnreg train`` registered on a Typer app (the stand-in method behind create_method)."""

from __future__ import annotations

import typer
import yaml
from typer.testing import CliRunner

import learnreg.methods.registry as registry
from learnreg.cli.train import register_command

from ._standin import StandIn


def test_train_command(ants2d, tmp_path, monkeypatch):
    seen = {}

    def fake_create(name, **cfg):
        seen["name"], seen["cfg"] = name, cfg
        return StandIn(**cfg)

    monkeypatch.setattr(registry, "create_method", fake_create)
    app = typer.Typer()
    register_command(app)

    @app.command("noop")
    def noop() -> None:  # a second command, so "train" is a subcommand as in learnreg
        pass

    cfg = {
        "method": "standin",
        "method_config": {"features": 4},
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
    assert seen == {"name": "standin", "cfg": {"features": 4}}
    assert "trained 2 steps" in r.output and (out / "checkpoints" / "last.pt").is_file()
    r = CliRunner().invoke(
        app, ["train", str(path), "--set", "steps=3", "--resume", "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "trained 3 steps" in r.output
    bad = CliRunner().invoke(app, ["train", str(path), "--set", "optimizer.foo=1"])
    assert bad.exit_code != 0 and "valid keys" in str(bad.exception)
