"""configs/examples/: the README's first training run parses, prepares its data with a line
per pair from the first second, caches the pre-alignments on disk, and trains."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from typer.testing import CliRunner

from learnreg.cli.main import app

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "examples" / "ants2d-voxelmorph.yaml"


def test_example_trains_and_reuses_its_prealignments(data_root: Path, tmp_path: Path):
    config = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    config["data"]["images"] = str(data_root / "ants2d")
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    cache = tmp_path / "cache"
    os.environ["LEARNREG_CACHE"], old = str(cache), os.environ["LEARNREG_CACHE"]
    try:
        for run in ("a", "b"):
            res = CliRunner().invoke(
                app,
                [
                    "train",
                    str(path),
                    "-o",
                    str(tmp_path / run),
                    "--set",
                    "steps=4",
                    "--set",
                    "val_every=2",
                ],
            )
            assert res.exit_code == 0, (res.output, res.exception)
            err = res.output + (res.stderr if res.stderr_bytes is not None else "")
            assert "pre-aligning (affine) training pairs 1/4: r27slice → r16slice" in err
            assert "validation pairs 1/1: r85slice → r16slice" in err
            done = "5 cached, 0 computed" if run == "b" else "0 cached, 5 computed"
            assert done in err, err
            assert (tmp_path / run / "checkpoints" / "best.pt").is_file()
    finally:
        os.environ["LEARNREG_CACHE"] = old
    assert len(list((cache / "prealign").glob("affine-*.mat"))) == 5


def test_adversarial_example_trains_both_networks(data_root: Path, tmp_path: Path):
    """The GAN example: `learnreg train` steps the discriminator every 2nd step at its own
    learning rate and logs both losses; a resumed run continues from both optimizers."""
    from learnreg.train.checkpoint import load_checkpoint

    example = EXAMPLE.parent / "ants2d-fan-adversarial.yaml"
    config = yaml.safe_load(example.read_text(encoding="utf-8"))
    config["data"]["images"] = str(data_root / "ants2d")
    config["data"]["prealign"] = None
    path = tmp_path / "gan.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "run"
    for steps, resume in ((3, []), (4, ["--resume"])):  # 3 steps, then resumed to 4
        res = CliRunner().invoke(
            app,
            ["train", str(path), "-o", str(out), *resume, "--set", f"steps={steps}"]
            + ["--set", "checkpoint_every=1", "--set", "log_every=1", "--set", "val_every=100"],
        )
        assert res.exit_code == 0, (res.output, res.exception)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert int(state["optimizer"]["model"]["state"][0]["step"]) == 4
    assert int(state["optimizer"]["discriminator"]["state"][0]["step"]) == 2
    header = (out / "log.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert {"adversarial", "total", "total_discriminator"} <= set(header)
