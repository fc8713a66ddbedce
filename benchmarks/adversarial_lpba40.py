"""Benchmark: Fan 2018's adversarial similarity network on LPBA40 in 3D, against an
unsupervised diffeomorphic VoxelMorph trained for the same wall time on the same data.

Protocol (each network trained in its own fresh process by the project's Trainer, one
thread, seed 0; one RAS network grid of 40×48×40 over S01's field of view, 4 mm, as
``data.shape: [40, 48, 40]`` gives — the grid of ``dense_fields_3d.py``):

* ``fan-adversarial``: S01 (fixed) ← S11–S34 (moving), no labels; generator lr 1e-3,
  discriminator lr 1e-4 and one discriminator update per two generator updates, diffusion
  weight 10, patch discriminator (the method's recipe), batch 2, ``--steps`` steps;
* ``voxelmorph`` (unsupervised, diffeomorphic: LNCC window 5 + diffusion 1, 7 integration
  steps, no labels): the same pairs, same U-Net, for Fan's training wall time;
* scored on S01 ← S35–S40 (LPBA40's validation subjects in this project: never trained on,
  but they chose the recipe's settings in 2D, so not an independent test set): mean Dice of
  the 56 structures on the 4 mm grid (labels by nearest neighbour), % voxels with det J ≤ 0,
  seconds per pair; 95 % bootstrap CIs over the six pairs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adversarial_lpba40.py --steps 600

A smoke run: ``--steps 2 --train S11 S12 --output /tmp/adversarial_lpba40.json``. Writes
benchmarks/results/adversarial_lpba40.json (and the runs under
benchmarks/results/adversarial_lpba40/) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from dense_fields_2d import print_table, run_networks, scores, summary, write_report  # noqa: E402

from learnreg.core.image import Image  # noqa: E402
from learnreg.data.datasets import collate_pairs  # noqa: E402
from learnreg.data.random_warps import LPBA_HELDOUT, LPBA_TRAIN  # noqa: E402
from learnreg.methods.registry import create_method  # noqa: E402
from learnreg.train.config import TrainConfig  # noqa: E402
from learnreg.train.trainer import Trainer, build_datasets  # noqa: E402

DATA = Path(os.environ.get("LEARNREG_DATA", HERE.parent.parent / "shared" / "data")) / "lpba40"
OUT = HERE / "results"
UNET = {"ndim": 3, "enc_features": [16, 32, 32], "dec_features": [32, 32, 32, 16]}
METHODS = {
    "fan-adversarial": (
        "fan-adversarial",
        UNET,
        {"lr": 1e-3, "groups": {"discriminator": {"lr": 1e-4, "every": 2}}},
    ),
    "voxelmorph (same time)": (
        "voxelmorph",
        {
            **UNET,
            "similarity": {"lncc": {"window": 5}},
            "regularization": {"diffusion": 1.0},
            "integration_steps": 7,
        },
        {"lr": 1e-3},
    ),
}


class TimeUp(Exception):
    """Raised by the trainer's callback when the wall-time budget is spent."""


def train_config(
    name: str, steps: int, seed: int, train: list[str], out: Path, overrides: dict | None = None
) -> TrainConfig:
    """The run's config; ``overrides``: ``{"method_config": {...}, "optimizer": {...}}``
    merged into the method's (``--fan-overrides``)."""
    method, config, optimizer = METHODS[name]
    overrides = overrides or {}
    config = {**config, **overrides.get("method_config", {})}
    optimizer = {**optimizer, **overrides.get("optimizer", {})}
    return TrainConfig.from_dict(
        {
            "method": method,
            "method_config": config,
            "data": {
                "images": str(DATA / "images"),
                "labels": str(DATA / "labels"),
                "atlas": "S01",
                "train": list(train),
                "val": list(LPBA_HELDOUT),
                "shape": [40, 48, 40],
                "levels": 3,
            },
            "optimizer": optimizer,
            "steps": steps,
            "batch_size": 2,
            "val_every": 10**9,
            "checkpoint_every": max(steps, 1),
            "log_every": 25,
            "seed": seed,
            "output": str(out / name.split()[0]),
            "progress": False,
            "device": "cpu",
        }
    )


def run_network(
    name: str, steps: int, seconds: float | None, seed: int, train, out, overrides=None
) -> dict:
    """Train ``name`` (``steps``, or as many as ``seconds`` of training allow) and score it."""
    cfg = train_config(name, 10**9 if seconds else steps, seed, train, out, overrides)
    torch.manual_seed(seed)
    method = create_method(cfg.method, **cfg.method_config)
    train_set, val = build_datasets(cfg)
    t0 = time.perf_counter()

    def budget(trainer, step, losses):
        if seconds is not None and time.perf_counter() - t0 >= seconds:
            raise TimeUp

    trainer = Trainer(cfg, method, train_set, val, callback=budget)
    try:
        trainer.fit(overwrite=True)
    except TimeUp:
        pass
    train_seconds = time.perf_counter() - t0
    method.eval()
    rows = []
    for i in range(len(val)):
        b = collate_pairs([val[i]], val.grid)
        t1 = time.perf_counter()
        u = method.predict(b.fixed, b.moving, b.grid).displacement
        grid = val.grid
        pair = {
            "fixed_labels": Image(b.fixed_labels[0], grid, "S01"),
            "moving_labels": Image(b.moving_labels[0], grid, "moving"),
        }
        rows.append({**scores(u, pair), "seconds": time.perf_counter() - t1})
    return {
        "name": name,
        "method": cfg.method,
        "config": cfg.method_config,
        "optimizer": cfg.optimizer.__dict__,
        "supervised": False,
        "labels_in_training": False,
        "time_reference": name == "fan-adversarial",
        "steps": trainer.step,
        "train_seconds": train_seconds,
        "pairs": rows,
    }


def identity_row(train: list[str], out: Path) -> dict:
    cfg = train_config("fan-adversarial", 1, 0, train, out)
    _, val = build_datasets(cfg)
    rows = []
    for i in range(len(val)):
        b = collate_pairs([val[i]], val.grid)
        pair = {
            "fixed_labels": Image(b.fixed_labels[0], val.grid, "S01"),
            "moving_labels": Image(b.moving_labels[0], val.grid, "moving"),
        }
        rows.append({**scores(torch.zeros(1, 3, *val.grid.shape), pair), "seconds": 0.0})
    return {"name": "identity", "pairs": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", nargs="+", default=list(LPBA_TRAIN))
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--output", type=Path, default=OUT / "adversarial_lpba40.json")
    p.add_argument(
        "--fan-overrides",
        type=json.loads,
        default={},
        help='JSON merged into fan-adversarial\'s recipe, e.g. \'{"optimizer": {"groups": '
        '{"discriminator": {"lr": 1e-4, "every": 2}}}}\'',
    )
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    runs = a.output.with_suffix("")
    if a.run:
        overrides = a.fan_overrides if a.run == "fan-adversarial" else None
        result = run_network(a.run, a.steps, a.seconds, a.seed, a.train, runs, overrides)
        print(json.dumps(result))
        return
    results = [identity_row(a.train, runs)]
    args = ["--steps", str(a.steps), "--seed", str(a.seed), "--train", *a.train]
    args += ["--fan-overrides", json.dumps(a.fan_overrides)]
    run_networks(__file__, a.methods, [*args, "--output", str(a.output)], results)
    table = summary(results, None)
    write_report(a.output, a, table, results, protocol=__doc__.split("\n\n")[1])
    print_table(table, None)


if __name__ == "__main__":
    main()
