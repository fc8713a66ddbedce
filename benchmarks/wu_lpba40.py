"""Benchmark: Wu et al. 2016 (stacked sparse auto-encoder features + HAMMER-like matching)
against learnreg's classical default deformable registration on LPBA40, after the same affine
pre-alignment.

Protocol (../shared/data/lpba40):

* pre-alignment, shared by every method: learnreg's classical ``affine`` preset, S01 (fixed)
  ← each of S35–S40 (validation subjects: never trained on), on the 1 mm images;
* Wu: the auto-encoder is trained unsupervised (no labels) for ``--steps`` Adam steps on
  importance-sampled 5³ patches of the training subjects ``--train`` (default S11–S34) on a
  4 mm grid derived from S01 (40×48×40); the pair (moving through the affine) is matched on
  that grid with the hierarchy ``--levels``; also the same matching with the untrained
  (random) auto-encoder, as an ablation;
* classical: the ``default`` preset's deformable (diffeomorphic SVF, LNCC) stage, started
  from the same affine, on the 1 mm images;
* scores: each result (affine + deformation) carries the 1 mm moving label map (nearest
  neighbour) onto S01's grid; mean Dice over the 56 structures (labels used for scoring
  only, never in training or registration), with a 95 % percentile bootstrap CI over the
  pairs (:func:`learnreg.eval.statistics.bootstrap_ci`); % voxels with det J ≤ 0 of the
  deformable part; seconds per pair (registration only; Wu: matching, classical: the
  deformable stage; the shared affine is reported once).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/wu_lpba40.py --threads 1

Writes benchmarks/results/wu_lpba40.json (``--output``) and prints a Markdown table. A smoke
run: ``--steps 5 --train S11 --test S35 --output /tmp/wu.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from learnreg.core.files import atomic_write
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.eval.statistics import bootstrap_ci
from learnreg.io.images import read_image, read_labels
from learnreg.methods.registry import create_method
from learnreg.metrics import mean_dice
from learnreg.optimize.classical import register
from learnreg.optimize.config import preset
from learnreg.spatial.differential import jacobian_determinant
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.result import RegistrationResult

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LEARNREG_DATA", ROOT.parent / "shared" / "data")) / "lpba40"
OUT = ROOT / "benchmarks" / "results"
LEVELS_4MM = [[0.05, 4, 2, 3.0, 4], [0.15, 2, 1, 2.0, 4], [0.3, 1, 1, 1.5, 4]]
log = logging.getLogger("wu_lpba40")


def train_autoencoder(method, images: list[torch.Tensor], steps: int, seed: int) -> float:
    """Adam (lr 3e-3) on the method's own loss, 4 random training volumes per step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(method.parameters(), lr=3e-3)
    method.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(images), (4,), generator=gen)
        batch = torch.stack([images[int(i)] for i in idx])
        terms = method.loss(None, method(batch[:2], batch[2:]))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d: loss %.4f", step, float(terms["total"]))
    method.eval()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", nargs="+", default=[f"S{i}" for i in range(11, 35)])
    p.add_argument("--test", nargs="+", default=[f"S{i}" for i in range(35, 41)])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--levels", type=json.loads, default=LEVELS_4MM)
    p.add_argument("--smooth", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=OUT / "wu_lpba40.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    fixed = read_image(DATA / "images/S01.nii.gz")
    fixed_lab = read_labels(DATA / "labels/S01.nii.gz")
    ids = [int(v) for v in torch.unique(fixed_lab.data) if v > 0]
    pre = Preprocessor(NetworkGrid(spacing=(4.0,) * 3))
    grid = pre.grid_for(fixed)
    train = [pre.image(read_image(DATA / f"images/{n}.nii.gz"), grid).data for n in a.train]
    config = {"ndim": 3, "levels": a.levels, "smooth": a.smooth}
    random_wu = create_method("wu-features", **config).eval()
    wu = create_method("wu-features", **config)
    wu.load_state_dict(random_wu.state_dict())  # the ablation is this network before training
    train_seconds = train_autoencoder(wu, train, a.steps, a.seed)
    log.info("trained on %d volumes in %.0f s", len(train), train_seconds)
    deformable = preset("default")
    deformable.linear = []
    deformable = deformable.validate()
    f4 = pre.image(fixed, grid).batch()

    rows = {k: [] for k in ("affine", "classical default (SVF)", "wu", "wu (random weights)")}
    affine_seconds = []
    for subject in a.test:
        moving = read_image(DATA / f"images/{subject}.nii.gz")
        moving_lab = read_labels(DATA / f"labels/{subject}.nii.gz")
        t0 = time.perf_counter()
        affine = register(fixed, moving, "affine").linear()
        affine_seconds.append(time.perf_counter() - t0)

        def score(
            result: RegistrationResult,
            seconds: float,
            folds: float,
            moving_lab=moving_lab,
            subject=subject,
        ) -> dict:
            warped = result.warp(moving_lab, mode="nearest").data
            dice = mean_dice(fixed_lab.data, warped, ids)
            return {"subject": subject, "dice": dice, "folds_pct": folds, "seconds": seconds}

        rows["affine"].append(
            score(RegistrationResult.from_transform(affine, fixed.grid, moving.grid), 0.0, 0.0)
        )
        t0 = time.perf_counter()
        classical = register(fixed, moving, deformable, initial=affine)
        sec = time.perf_counter() - t0
        folds = 100.0 * float((classical.jacobian_determinant() <= 0).float().mean())
        rows["classical default (SVF)"].append(score(classical, sec, folds))
        m4 = pre.image(moving, grid, affine).batch()
        for name, method in (("wu", wu), ("wu (random weights)", random_wu)):
            t0 = time.perf_counter()
            u = method.predict(f4, m4, grid).displacement
            sec = time.perf_counter() - t0
            folds = 100.0 * float((jacobian_determinant(u) <= 0).float().mean())
            result = RegistrationResult.from_transform(
                DisplacementField(grid, u), fixed.grid, moving.grid, then=affine
            )
            rows[name].append(score(result, sec, folds))
        log.info(
            "%s: %s",
            subject,
            ", ".join(f"{k} {v[-1]['dice']:.4f}" for k, v in rows.items()),
        )

    summary = {}
    for name, rs in rows.items():
        dice = [r["dice"] for r in rs]
        est, lo, hi = bootstrap_ci(np.array(dice))
        summary[name] = {
            "dice": est,
            "dice_ci95": [lo, hi],
            "folds_pct_max": max(r["folds_pct"] for r in rs),
            "seconds_mean": float(np.mean([r["seconds"] for r in rs])),
        }
    result = {
        "protocol": "S01 <- " + " ".join(a.test) + " (validation subjects), shared classical "
        "affine; labels used for scoring only (no method trains on labels)",
        "train": a.train,
        "steps": a.steps,
        "train_seconds": train_seconds,
        "affine_seconds_mean": float(np.mean(affine_seconds)),
        "method_config": wu.config,
        "summary": summary,
        "pairs": rows,
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(a.output) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=float))
    print(
        "| method (labels in training: none) | mean Dice (56 labels) | 95 % CI | "
        "% det J ≤ 0 (max) | s / pair |"
    )
    print("|---|---|---|---|---|")
    for name, s in summary.items():
        lo, hi = s["dice_ci95"]
        print(
            f"| {name} | {s['dice']:.4f} | [{lo:.4f}, {hi:.4f}] | {s['folds_pct_max']:.3f} | "
            f"{s['seconds_mean']:.1f} |"
        )
    print(
        f"\nshared affine: {np.mean(affine_seconds):.1f} s / pair; Wu training {train_seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
