"""Benchmark: Sergeev et al. (2012) learned interest-point detectors + RANSAC affine against
learnreg's classical affine registration (preset ``affine``) and the identity, on LPBA40.

Protocol (../shared/data/lpba40):

* training (``learnreg train``'s trainer, config written beside the result): method
  ``sergeev2012`` with one detector per atlas structure (56), on the ``interest-points``
  source — S01's structure centroids carried to each training subject S11–S34 by learnreg's
  classical ``default`` registration (rigid → affine → SVF, LNCC) on the 4 mm network grid
  (40×48×40); ``--steps`` Adam steps, batch ``--batch``, no validation set (S35–S40 are the
  test pairs here, so nothing is selected on them; the last checkpoint is used). Labels used
  in training: S01's label map only, to define the landmarks; no subject's labels;
* test: fixed S01, moving each of S35–S40 (validation subjects, never trained on), both at
  1 mm as stored: the model through the same prediction path as ``learnreg register
  --model`` (:func:`learnreg.zoo.predict.predict`: both images onto the 4 mm grid over S01's
  field of view, detection, RANSAC, the affine in world space), the classical ``affine``
  preset on the 1 mm images (as ``learnreg register --preset affine`` runs it), and the
  identity. Each method's world affine carries the 1 mm moving label map (nearest
  neighbour) onto S01's grid; mean Dice over the 56 structures; seconds per pair (one
  thread; the model's time includes putting both images on its grid).
* statistics: mean Dice with 95 % percentile-bootstrap intervals over the pairs
  (:func:`learnreg.eval.statistics.bootstrap_ci`), the paired difference Sergeev − classical
  with its interval (:func:`~learnreg.eval.statistics.paired_comparison`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sergeev_lpba40.py

Writes benchmarks/results/sergeev_lpba40.json (``--output``; the training run beside it in
``sergeev_lpba40_run/``) and prints a Markdown table. A smoke run: ``--steps 3 --train S11
S12 --test S35 --output /tmp/sergeev.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from learnreg.cli.train import run_training
from learnreg.core.files import atomic_write
from learnreg.data.random_warps import LPBA_HELDOUT, LPBA_TRAIN
from learnreg.eval.statistics import bootstrap_ci, paired_comparison
from learnreg.io.images import read_image, read_labels
from learnreg.metrics import mean_dice
from learnreg.optimize.classical import register
from learnreg.spatial.result import RegistrationResult
from learnreg.zoo.models import load_model
from learnreg.zoo.predict import predict

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "lpba40"


def train_model(args, run: Path) -> Path:
    """Train the detectors with the project's trainer; returns the last checkpoint."""
    config = {
        "method": "sergeev2012",
        "method_config": {"landmarks": 56, "negatives": args.negatives},
        "data": {
            "shape": [40, 48, 40],
            "synthetic": {
                "kind": "interest-points",
                "folder": str(args.data),
                "registration": "default",
                "subjects": args.train,
                "val_subjects": [],
            },
        },
        "optimizer": {"lr": args.lr},
        "steps": args.steps,
        "batch_size": args.batch,
        "seed": args.seed,
        "progress": False,
        "device": "cpu",
    }
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    path = run / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    run_training(path, output=run / "run")
    return run / "run" / "checkpoints" / "last.pt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--train", nargs="+", default=list(LPBA_TRAIN))
    p.add_argument("--test", nargs="+", default=list(LPBA_HELDOUT))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--negatives", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", type=Path, default=HERE / "results" / "sergeev_lpba40.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = args.output.with_name(args.output.stem + "_run")
    t0 = time.perf_counter()
    ckpt = train_model(args, run)
    train_seconds = time.perf_counter() - t0
    model = load_model(ckpt)

    fixed = read_image(args.data / "images" / "S01.nii.gz")
    fixed_lab = read_labels(args.data / "labels" / "S01.nii.gz")
    values = sorted(int(v) for v in torch.unique(fixed_lab.data).tolist() if v != 0)
    rows = []
    for name in args.test:
        moving = read_image(args.data / "images" / f"{name}.nii.gz")
        moving_lab = read_labels(args.data / "labels" / f"{name}.nii.gz")

        def dice(result: RegistrationResult, moving_lab=moving_lab) -> float:
            warped = result.warp(moving_lab, mode="nearest")
            return mean_dice(fixed_lab.data, warped.data, values)

        row = {"subject": name, "identity": dice(RegistrationResult(fixed.grid, moving.grid))}
        t = time.perf_counter()
        ours = predict(fixed, moving, model)
        row["sergeev_seconds"] = time.perf_counter() - t
        row["sergeev"] = dice(ours)
        t = time.perf_counter()
        classical = register(fixed, moving, "affine")
        row["classical_seconds"] = time.perf_counter() - t
        row["classical"] = dice(classical)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    summary = {}
    for key in ("identity", "classical", "sergeev"):
        est, lo, hi = bootstrap_ci([r[key] for r in rows])
        seconds = [r[f"{key}_seconds"] for r in rows] if key != "identity" else [0.0]
        summary[key] = {"dice": est, "low": lo, "high": hi, "seconds": float(np.mean(seconds))}
    diff = paired_comparison([r["sergeev"] for r in rows], [r["classical"] for r in rows])
    result = {
        "protocol": __doc__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_seconds": train_seconds,
        "checkpoint": str(ckpt),
        "pairs": rows,
        "summary": summary,
        "sergeev_minus_classical": diff,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.output) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2))

    labels = {
        "identity": ("identity", "—"),
        "classical": ("classical affine (preset `affine`, 1 mm)", "no (not trained)"),
        "sergeev": (
            "Sergeev 2012: 56 MLP detectors + RANSAC (4 mm)",
            "atlas S01 labels only (landmark definition); no subject labels",
        ),
    }
    print(f"\nLPBA40, fixed S01, moving {', '.join(args.test)} (validation subjects), Dice")
    print("after the affine (56 structures, 1 mm, labels not used at test time)\n")
    print("| method | Dice [95 % CI] | s / pair | labels used in training |")
    print("|---|---|---|---|")
    for key, s in summary.items():
        name, lab = labels[key]
        print(
            f"| {name} | {s['dice']:.4f} [{s['low']:.4f}, {s['high']:.4f}] | {s['seconds']:.2f} | {lab} |"
        )
    print(
        f"\nSergeev − classical: {diff['difference']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]"
        f" (n = {diff['n']}); training {train_seconds:.0f} s ({args.steps} steps)"
    )


if __name__ == "__main__":
    main()
