"""Weakly supervised MR→TRUS prostate registration (Hu et al., MedIA 2018) on ../shared/data.

Trains ``hu-global-local`` on the 25 training pairs with the project's
:class:`~learnreg.train.Trainer` (labels only in the loss; label-reg's random affine
augmentation of each image), in two stages: the global (affine) network alone, then the
composite (affine then dense) model, its global network initialized from stage one (the
config's ``init:``, stage one's checkpoint) and trained end to end. Every image is resampled
in physical space onto one network grid (the TRUS field of view at ``--spacing`` mm).

Evaluation on the two test pairs, on the native TRUS grid in world millimetres: the
predicted world transform (the method's output on the network grid: an affine, or the dense
field then the affine) pulls the native MR masks onto the TRUS grid; gland Dice (channel 0,
masks thresholded at 0.5) and the TRE of the landmark-region centroids (channels 1–2):
``|φ(c_TRUS) − c_MR|`` with ``φ`` the fixed→moving transform. Rows: identity (world
coordinates as stored), global (affine) only, global + local.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prostate_hu.py --threads 1

(defaults: ``--global-steps 300 --composite-steps 600``; a smoke run: ``--global-steps 3
--composite-steps 3 --output /tmp/prostate_hu.json``).

Prints a table and writes ``benchmarks/results/prostate_hu.json`` (and the Trainer's logs and
checkpoints under ``benchmarks/results/prostate_hu/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from learnreg.core.files import atomic_write
from learnreg.data.prostate import MaskAugmenter, ProstatePairs, mask_centroids, warp_masks
from learnreg.methods.registry import create_method
from learnreg.metrics import dice_per_label, tre
from learnreg.train.config import OptimizerConfig, TrainConfig
from learnreg.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "prostate_mr_trus"
RESULTS = ROOT / "benchmarks" / "results"


def evaluate(method: torch.nn.Module | None, data: ProstatePairs) -> list[dict]:
    """Gland Dice and landmark-centroid TRE (mm) of every pair of ``data`` on the native
    fixed grid; ``method=None`` is the identity."""
    rows = []
    for i in range(len(data)):
        item, o = data[i], data.originals(i)
        t0 = time.perf_counter()
        if method is None:
            field = None
        else:
            field = method.predict(item["fixed"][None], item["moving"][None], data.grid).transform
        seconds = time.perf_counter() - t0
        fixed_m, moving_m = o["fixed_labels"], o["moving_labels"]
        warped = warp_masks(moving_m, o["fixed"].grid, field)
        dice = dice_per_label(fixed_m.data[0].to(torch.uint8), warped[0], labels=[1])[1]
        cf, cm = mask_centroids(fixed_m), mask_centroids(moving_m)
        present = [
            c for c in range(1, cf.shape[0]) if not (cf[c].isnan().any() or cm[c].isnan().any())
        ]
        errors, _ = tre(cf[present], cm[present], field)
        rows.append(
            {
                "case": data.cases[i].name,
                "gland_dice": float(dice),
                "landmark_tre_mm": {
                    f"landmark {c}": float(e) for c, e in zip(present, errors, strict=True)
                },
                "mean_tre_mm": float(errors.mean()) if len(present) else math.nan,
                "gland_centroid_error_mm": float(tre(cf[:1], cm[:1], field)[1]),
                "predict_seconds": seconds,
            }
        )
    return rows


def train(
    stage: str,
    method_config: dict,
    steps: int,
    lr: float,
    batch: int,
    data: ProstatePairs,
    output: Path,
    init: Path | None = None,
    max_seconds: float | None = None,
    chunk: int = 50,
) -> tuple[torch.nn.Module, int, float]:
    """Train one stage with the project's Trainer (a fresh ``output`` folder), from the
    checkpoint ``init`` if given (the composite's global network takes a global run's
    weights); returns the method, the steps done and the wall time. With ``max_seconds``,
    training runs in chunks of ``chunk`` steps (each resuming from the previous chunk's
    checkpoint, optimizer state included) and stops after the first chunk that ends past the
    time budget."""
    if (output / "checkpoints").is_dir():  # our own earlier run: never resume from it
        shutil.rmtree(output / "checkpoints")
    torch.manual_seed(0)
    cfg = {**method_config, "stage": stage}
    method = create_method("hu-global-local", **cfg)
    config = TrainConfig(
        method="hu-global-local",
        method_config=cfg,
        optimizer=OptimizerConfig(name="adam", lr=lr),
        steps=steps,
        batch_size=batch,
        checkpoint_every=steps,
        log_every=max(1, steps // 20),
        output=str(output),
        init=None if init is None else str(init),
        device="cpu",
        progress=False,
    )
    trainer = Trainer(config, method, data, None, augmenter=MaskAugmenter())
    t0 = time.perf_counter()
    if max_seconds is None:
        trainer.fit()
    else:
        while trainer.step < steps and time.perf_counter() - t0 < max_seconds:
            trainer.fit(resume=True, until=min(steps, trainer.step + chunk))
    return method, trainer.step, time.perf_counter() - t0


def summary(rows: list[dict]) -> dict:
    tres = [v for r in rows for v in r["landmark_tre_mm"].values()]
    return {
        "gland_dice": sum(r["gland_dice"] for r in rows) / len(rows),
        "landmark_tre_mm": sum(tres) / len(tres) if tres else math.nan,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--spacing", type=float, default=0.8, help="network grid spacing, mm")
    p.add_argument("--global-steps", type=int, default=300)
    p.add_argument("--composite-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="stop composite training (at a 50-step boundary) once both stages took this long",
    )
    p.add_argument("--output", type=Path, default=RESULTS / "prostate_hu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    train_set = ProstatePairs(args.data, "train", spacing=args.spacing, levels=3)
    test_set = ProstatePairs(args.data, "test", grid=train_set.grid)
    load_s = time.perf_counter() - t0
    method_config = {"ndim": 3, "shape": list(train_set.grid.shape)}
    run_dir = args.output.with_suffix("")

    results: dict[str, dict] = {"identity": {"cases": evaluate(None, test_set)}}
    global_m, global_n, global_s = train(
        "global",
        method_config,
        args.global_steps,
        args.lr,
        args.batch,
        train_set,
        run_dir / "global",
    )
    results["global (affine)"] = {
        "cases": evaluate(global_m, test_set),
        "steps": global_n,
        "train_seconds": global_s,
    }
    budget = None if args.budget_minutes is None else 60 * args.budget_minutes - global_s
    comp_m, comp_n, comp_s = train(
        "composite",
        method_config,
        args.composite_steps,
        args.lr,
        args.batch,
        train_set,
        run_dir / "composite",
        init=run_dir / "global" / "checkpoints" / "last.pt",
        max_seconds=budget,
    )
    results["global + local"] = {
        "cases": evaluate(comp_m, test_set),
        "steps": global_n + comp_n,
        "composite_steps": comp_n,
        "train_seconds": global_s + comp_s,
    }
    for r in results.values():
        r.update(summary(r["cases"]))

    names = [c["case"] for c in results["identity"]["cases"]]
    head = f"{'method':<18}" + "".join(f"{n + ' Dice':>17}{n + ' TRE':>17}" for n in names)
    head += f"{'mean Dice':>11}{'mean TRE':>10}{'steps':>7}{'train s':>9}"
    print(head)
    for name, r in results.items():
        line = f"{name:<18}"
        for c in r["cases"]:
            line += f"{c['gland_dice']:>17.3f}{c['mean_tre_mm']:>17.2f}"
        line += f"{r['gland_dice']:>11.3f}{r['landmark_tre_mm']:>10.2f}"
        line += f"{r.get('steps', 0):>7}{r.get('train_seconds', 0.0):>9.0f}"
        print(line)

    payload = {
        "benchmark": "prostate MR→TRUS, hu-global-local (Hu et al., MedIA 2018)",
        "data": str(args.data),
        "train_pairs": len(train_set),
        "test_pairs": names,
        "network_grid": train_set.grid.to_dict(),
        "method_config": method_config,
        "defaults": {k: v for k, v in comp_m.config.items() if k not in ("shape", "stage")},
        "training": {
            "batch": args.batch,
            "lr": args.lr,
            "optimizer": "adam",
            "augmentation": "random affine per image (MaskAugmenter defaults)",
            "global_steps": global_n,
            "composite_steps": comp_n,
            "composite_steps_requested": args.composite_steps,
            "budget_minutes": args.budget_minutes,
            "threads": args.threads,
            "load_seconds": load_s,
        },
        "units": {"dice": "gland, native TRUS grid", "tre": "mm, world (headers as stored)"},
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.output) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
