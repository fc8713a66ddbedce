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

``--adversarial`` adds the row ``global + local, adversarial``: ``hu-adversarial`` (Hu et al.,
MICCAI 2018), the same composite with the bending energy replaced by a discriminator of
simulated linear-elastic probe displacements (its defaults: adversarial weight 0.05, no
bending energy), started from the same global checkpoint and trained for the same steps on
the same data and batches (the Trainer's seed), the discriminator by its own Adam at
``--lr``. Every row with a local network also reports the smoothness of its local
displacement on the network grid: SDlogJ (std of log det J, folds clipped) over the whole
grid and within the fixed gland (the resampled TRUS mask > 0.5), and the % of voxels with
det J ≤ 0; with ``--adversarial`` also of the simulated reference DDFs the discriminator
was shown (20 per test pair, on its fixed gland). 95 % percentile-bootstrap intervals (``learnreg.eval.statistics``) are given
only where a metric has at least 4 values: the landmark TRE (4 landmarks over the 2 test
pairs; with so few values the interval is indicative only) and, with ``--adversarial``, the
paired TRE difference of the two composites per landmark.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prostate_hu.py --threads 1

(defaults: ``--global-steps 300 --composite-steps 600``; a smoke run: ``--global-steps 3
--composite-steps 3 --adversarial --output /tmp/prostate_hu.json``).

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
from learnreg.data.datasets import collate_pairs
from learnreg.data.prostate import MaskAugmenter, ProstatePairs, mask_centroids, warp_masks
from learnreg.eval.statistics import bootstrap_ci, paired_comparison
from learnreg.methods.registry import create_method
from learnreg.metrics import dice_per_label, tre
from learnreg.metrics.deformation import jacobian_stats
from learnreg.train.config import OptimizerConfig, TrainConfig
from learnreg.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "prostate_mr_trus"
RESULTS = ROOT / "benchmarks" / "results"
MIN_CI_VALUES = 4  # fewer values: no bootstrap interval


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
        row = {
            "case": data.cases[i].name,
            "gland_dice": float(dice),
            "landmark_tre_mm": {
                f"landmark {c}": float(e) for c, e in zip(present, errors, strict=True)
            },
            "mean_tre_mm": float(errors.mean()) if len(present) else math.nan,
            "gland_centroid_error_mm": float(tre(cf[:1], cm[:1], field)[1]),
            "predict_seconds": seconds,
        }
        if method is not None:
            row.update(smoothness(method, item, data.grid.spacing))
        rows.append(row)
    return rows


def smoothness(method: torch.nn.Module, item: dict, spacing: tuple[float, ...]) -> dict:
    """SDlogJ of the local displacement on the network grid (whole grid and within the
    fixed gland, mask > 0.5), the % of its voxels with det J ≤ 0 and its largest magnitude
    (mm); empty without a local network."""
    with torch.no_grad():
        out = method(item["fixed"][None], item["moving"][None])
    local = out.extras.get("local_displacement")
    return {} if local is None else field_stats(local, item["fixed_labels"][0] > 0.5, spacing)


def field_stats(u: torch.Tensor, gland: torch.Tensor, spacing: tuple[float, ...]) -> dict:
    """:func:`smoothness` of one voxel-unit field ``(1, D, *S)``."""
    grid, inside = jacobian_stats(u), jacobian_stats(u, gland)
    mm = u * torch.tensor(spacing, dtype=u.dtype).view(1, -1, *[1] * (u.dim() - 2))
    return {
        "sdlogj_grid": grid["sdlogj"],
        "sdlogj_gland": inside["sdlogj"],
        "folding_percent": 100 * grid["folding_fraction"],
        "max_local_mm": float(mm.norm(dim=1).max()),
    }


def reference_fields(method: torch.nn.Module, data: ProstatePairs, samples: int = 20) -> dict:
    """The same statistics, averaged, of ``samples`` simulated reference DDFs of
    ``hu-adversarial`` per test pair (placed on its fixed gland; seed 0): what its
    discriminator was shown as plausible."""
    torch.manual_seed(0)
    sums: dict[str, float] = {}
    for i in range(len(data)):
        item = data[i]
        batch = collate_pairs([item] * samples, data.grid)
        with torch.no_grad():
            ref = method.reference_displacements(batch, data.grid)  # mm along the index axes
        vox = ref / torch.tensor(data.grid.spacing, dtype=ref.dtype).view(1, -1, 1, 1, 1)
        for j in range(samples):
            for k, v in field_stats(
                vox[j : j + 1], item["fixed_labels"][0] > 0.5, data.grid.spacing
            ).items():
                sums[k] = sums.get(k, 0.0) + v / (samples * len(data))
    return sums


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
    method_name: str = "hu-global-local",
) -> tuple[torch.nn.Module, int, float]:
    """Train one stage with the project's Trainer (a fresh ``output`` folder), from the
    checkpoint ``init`` if given (the composite's global network takes a global run's
    weights); returns the method, the steps done and the wall time. With ``max_seconds``,
    training runs in chunks of ``chunk`` steps (each resuming from the previous chunk's
    checkpoint, optimizer state included) and stops after the first chunk that ends past the
    time budget. ``method_name``: ``hu-global-local`` or ``hu-adversarial`` (both groups at
    ``lr``; its ``init`` may be a ``hu-global-local`` global stage, ``init_methods``)."""
    if (output / "checkpoints").is_dir():  # our own earlier run: never resume from it
        shutil.rmtree(output / "checkpoints")
    torch.manual_seed(0)
    cfg = {**method_config, "stage": stage}
    method = create_method(method_name, **cfg)
    config = TrainConfig(
        method=method_name,
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


def landmark_errors(rows: list[dict]) -> list[float]:
    return [v for r in rows for v in r["landmark_tre_mm"].values()]


def with_ci(values: list[float]) -> dict:
    """Mean, n and (with at least MIN_CI_VALUES values) the 95 % bootstrap interval."""
    mean, low, high = bootstrap_ci(values) if values else (math.nan,) * 3
    if len(values) < MIN_CI_VALUES:
        low = high = math.nan
    return {"mean": mean, "low": low, "high": high, "n": len(values)}


def summary(rows: list[dict]) -> dict:
    tres = landmark_errors(rows)
    out = {
        "gland_dice": sum(r["gland_dice"] for r in rows) / len(rows),
        "landmark_tre_mm": sum(tres) / len(tres) if tres else math.nan,
        "landmark_tre_ci": with_ci(tres),
    }
    for key in ("sdlogj_grid", "sdlogj_gland", "folding_percent", "max_local_mm"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = sum(values) / len(values)
    return out


def interval(ci: dict) -> str:
    return "" if math.isnan(ci["low"]) else f"[{ci['low']:.2f}, {ci['high']:.2f}]"


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
    p.add_argument(
        "--adversarial",
        action="store_true",
        help="also train hu-adversarial (Hu 2018's discriminator regularizer) from the same "
        "global checkpoint, same steps and data",
    )
    p.add_argument(
        "--residual-local",
        action="store_true",
        help="also train the composite with the paper's residual local net (local_net: "
        "residual, multi-scale displacement summands) from the same global checkpoint, same "
        "steps and data",
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
    if args.residual_local:
        res_m, res_n, res_s = train(
            "composite",
            {**method_config, "local_net": "residual"},
            comp_n,
            args.lr,
            args.batch,
            train_set,
            run_dir / "residual",
            init=run_dir / "global" / "checkpoints" / "last.pt",
        )
        results["global + local (residual local net)"] = {
            "cases": evaluate(res_m, test_set),
            "steps": global_n + res_n,
            "composite_steps": res_n,
            "train_seconds": global_s + res_s,
        }
    if args.adversarial:
        adv_m, adv_n, adv_s = train(
            "composite",
            method_config,
            comp_n,  # the same number of steps as the composite without the discriminator
            args.lr,
            args.batch,
            train_set,
            run_dir / "adversarial",
            init=run_dir / "global" / "checkpoints" / "last.pt",
            method_name="hu-adversarial",
        )
        results["global + local, adversarial"] = {
            "cases": evaluate(adv_m, test_set),
            "steps": global_n + adv_n,
            "composite_steps": adv_n,
            "train_seconds": global_s + adv_s,
            "config": {
                k: v for k, v in adv_m.config.items() if k not in ("shape", "stage", "ndim")
            },
        }
    for r in results.values():
        r.update(summary(r["cases"]))
    comparison = reference = None
    if args.adversarial:
        reference = reference_fields(adv_m, test_set)
        a = landmark_errors(results["global + local, adversarial"]["cases"])
        b = landmark_errors(results["global + local"]["cases"])
        comparison = paired_comparison(a, b)  # TRE per landmark, adversarial − bending

    names = [c["case"] for c in results["identity"]["cases"]]
    head = f"{'method':<38}" + "".join(f"{n + ' Dice':>17}{n + ' TRE':>17}" for n in names)
    head += f"{'mean Dice':>11}{'mean TRE':>10}{'TRE 95% CI':>15}"
    head += f"{'SDlogJ':>8}{'gland':>7}{'%|J|<=0':>9}{'steps':>7}{'train s':>9}"
    print(head)
    for name, r in results.items():
        line = f"{name:<38}"
        for c in r["cases"]:
            line += f"{c['gland_dice']:>17.3f}{c['mean_tre_mm']:>17.2f}"
        line += f"{r['gland_dice']:>11.3f}{r['landmark_tre_mm']:>10.2f}"
        line += f"{interval(r['landmark_tre_ci']):>15}"
        if "sdlogj_grid" in r:
            line += f"{r['sdlogj_grid']:>8.3f}{r['sdlogj_gland']:>7.3f}"
            line += f"{r['folding_percent']:>9.3f}"
        else:
            line += f"{'':>24}"
        line += f"{r.get('steps', 0):>7}{r.get('train_seconds', 0.0):>9.0f}"
        print(line)
    if reference is not None:
        line = f"{'reference DDFs (simulated)':<38}" + " " * (34 * len(names) + 36)
        line += f"{reference['sdlogj_grid']:>8.3f}{reference['sdlogj_gland']:>7.3f}"
        print(line + f"{reference['folding_percent']:>9.3f}")
    if comparison is not None:
        print(
            f"TRE adversarial − bending, per landmark (n = {comparison['n']}): "
            f"{comparison['difference']:+.2f} mm [{comparison['low']:+.2f}, "
            f"{comparison['high']:+.2f}], Wilcoxon p = {comparison['p_value']:.2f}"
        )

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
            "adversarial": args.adversarial,
            "residual_local": args.residual_local,
            "budget_minutes": args.budget_minutes,
            "threads": args.threads,
            "load_seconds": load_s,
        },
        "units": {
            "dice": "gland, native TRUS grid",
            "tre": "mm, world (headers as stored)",
            "sdlogj": "local displacement, network grid (whole grid / fixed gland)",
            "ci": f"95 % percentile bootstrap, only with >= {MIN_CI_VALUES} values",
        },
        "results": results,
        "tre_adversarial_minus_bending": comparison,
        "reference_fields": reference,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.output) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
