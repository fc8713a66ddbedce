"""Benchmark: DLIR (de Vos et al. 2019), affine then B-spline stages, on LPBA40, against the
classical affine and the classical deformable registration and the identity.

Protocol (../shared/data/lpba40, all volumes on one 4 mm network grid, 40×48×40, derived
from S01, as in ``benchmarks/affine_networks.py``):

* training, unsupervised (NCC, bending energy on the B-spline stages), fixed S01, moving a
  training subject (S11–S34) moved by a random affine transform (rotation ±``--rotation``°,
  translation ±``--translation`` mm per axis, scale ±``--scale``, shear ±``--shear``); DLIR's
  stage-wise schedule: the affine stage for ``--affine-steps`` steps, then each B-spline
  stage (control spacings ``--spacings`` voxels, coarse to fine) for ``--bspline-steps``
  steps with the earlier stages frozen; Adam, batch ``--batch``. Each stage is one run of the
  project's trainer (:mod:`learnreg.train`) on the ``perturb`` training source, configured as
  ``learnreg train`` would be: ``method_config.trainable_stages: [k]`` and ``init:`` the
  previous stage's last checkpoint (logs and checkpoints beside the JSON result);
* test: fixed S01, moving each of S35–S40 moved by ``--pairs`` random affine transforms of the
  same distribution (fixed seed); each method's transform, composed with the known
  perturbation, carries the *full-resolution* moving label map (nearest neighbour) onto S01's
  1 mm grid; mean Dice over the 56 structures, and the percentage of folded voxels
  (det J ≤ 0 of the 4 mm transform) for the deformable ones;
* methods: identity; classical ``affine`` preset and classical ``default`` preset (affine then
  diffeomorphic SVF, LNCC), both on the same 4 mm images; DLIR after its affine stage and after
  all B-spline stages (its world transform: the affine alone, and the chain of B-splines then
  the affine); per-pair time (networks: forward pass, no gradients).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dlir_lpba40.py --threads 1

(defaults: ``--affine-steps 1500 --bspline-steps 600``). Writes
benchmarks/results/dlir_lpba40.json (``--output``) and prints a Markdown table. A smoke run:
``--affine-steps 3 --bspline-steps 3 --train S11 S12 --test S35 --pairs 1 --output
/tmp/dlir_lpba40.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import affine_networks as an  # noqa: E402

from learnreg.core.files import atomic_write  # noqa: E402
from learnreg.core.grid import Grid  # noqa: E402
from learnreg.core.image import Image  # noqa: E402
from learnreg.data.perturb import PerturbedPairs, RandomPerturbation, params_to_matrix  # noqa: E402
from learnreg.data.preprocess import NetworkGrid, Preprocessor  # noqa: E402
from learnreg.eval.statistics import bootstrap_ci  # noqa: E402
from learnreg.io.images import read_image, read_labels  # noqa: E402
from learnreg.methods.dlir import DLIR  # noqa: E402
from learnreg.optimize.classical import register  # noqa: E402
from learnreg.spatial.affine import AffineTransform  # noqa: E402
from learnreg.spatial.base import SpatialTransform, TransformChain  # noqa: E402
from learnreg.spatial.differential import jacobian_determinant  # noqa: E402
from learnreg.spatial.result import split_linear  # noqa: E402
from learnreg.spatial.sampling import resample  # noqa: E402

log = logging.getLogger("dlir_lpba40")


def dlir_transforms(
    model: DLIR, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid, prefix: str = "dlir"
) -> dict:
    """DLIR's world transforms (fixed → moving) after each stage, and the seconds taken."""
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.predict(fixed[None], moving[None], grid)
    seconds = time.perf_counter() - t0
    _, affine = split_linear(out.transform)  # the affine stage: the chain's last transform
    res = {f"{prefix} affine": (affine, None, seconds)}
    if model.spacings:
        name = f"{prefix} affine + B-spline {'+'.join(map(str, model.spacings))}"
        det = jacobian_determinant(out.displacement)[0]  # of the whole 4 mm map
        res[name] = (out.transform, det, seconds)
    return res


def classical_transform(preset: str, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid):
    t0 = time.perf_counter()
    r = register(Image(fixed, grid, "fixed"), Image(moving, grid, "moving"), preset)
    seconds = time.perf_counter() - t0
    det = r.jacobian_determinant() if r.deformable is not None else None
    return r.transform(), det, seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--spacing", type=float, default=4.0, help="network grid spacing, mm")
    p.add_argument("--train", nargs="+", default=[f"S{i}" for i in range(11, 35)])
    p.add_argument("--test", nargs="+", default=[f"S{i}" for i in range(35, 41)])
    p.add_argument("--spacings", type=int, nargs="*", default=[8, 4], help="B-spline stages")
    p.add_argument("--affine-steps", type=int, default=1500)
    p.add_argument("--bspline-steps", type=int, default=600, help="per B-spline stage")
    p.add_argument("--affine-lr", type=float, default=2e-3)
    p.add_argument("--bspline-lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rotation", type=float, default=10.0, help="max degrees per axis")
    p.add_argument("--translation", type=float, default=8.0, help="max mm per axis")
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--shear", type=float, default=0.05)
    p.add_argument("--pairs", type=int, default=2, help="perturbations per test subject")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["16:leaky_relu"],
        metavar="KERNELS:ACTIVATION",
        help="networks to train and compare in this run, e.g. 16:leaky_relu 32:elu (paper)",
    )
    p.add_argument("--output", type=Path, default=an.OUT / "dlir_lpba40.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    pre = Preprocessor(NetworkGrid(spacing=(a.spacing,) * 3))
    grid = pre.grid_for(read_image(an.DATA / "images/S01.nii.gz"))
    images = an.load_subjects(["S01", *a.test], pre, grid)
    tvox = a.translation / a.spacing
    pert = RandomPerturbation("affine", a.rotation, tvox, a.scale, a.shear)
    synthetic = {
        "images": str(an.DATA / "images"),
        "atlas": "S01",
        "train": list(a.train),
        "transform": "affine",
        "rotation": a.rotation,
        "translation": tvox,
        "scale": a.scale,
        "shear": a.shear,
        "seed": a.seed + 1,
        "length": max(a.affine_steps, a.bspline_steps) * a.batch,  # one dataset, every stage
    }
    runs_dir = a.output.with_suffix("")
    training, models = {}, {}
    datasets = None
    for variant in a.variants:
        kernels, activation = variant.split(":")
        # one label per variant when several are compared; plain "dlir" for the default run
        label = "dlir" if len(a.variants) == 1 else f"dlir {kernels} kernels {activation}"
        method_config = {
            "ndim": 3,
            "bspline_spacings": list(a.spacings),
            "affine_features": int(kernels),
            "bspline_features": int(kernels),
            "activation": activation,
        }
        init = None
        folder = runs_dir if len(a.variants) == 1 else runs_dir / variant.replace(":", "-")
        for k in range(1 + len(a.spacings)):  # DLIR's stage-wise schedule, one run per stage
            steps, lr = (a.affine_steps, a.affine_lr) if k == 0 else (a.bspline_steps, a.bspline_lr)
            name = "affine" if k == 0 else f"B-spline {a.spacings[k - 1]}"
            cfg = an.train_config(
                "dlir",
                {**method_config, "trainable_stages": [k]},
                synthetic,
                a.spacing,
                steps,
                lr,
                a.batch,
                a.seed + k,  # each stage its own order of the random perturbations
                folder / f"stage{k}",
                init,
            )
            model, training[f"{label} {name}"], datasets = an.fit(cfg, datasets)
            init = str(folder / f"stage{k}" / "checkpoints" / "last.pt")
        assert isinstance(model, DLIR) and datasets[0].grid.allclose(grid)
        models[label] = model

    fixed_lab = read_labels(an.DATA / "labels/S01.nii.gz")
    labels = [v for v in torch.unique(fixed_lab.data).tolist() if v != 0]
    fixed_np = fixed_lab.data[0].numpy()
    base = [
        {"fixed": images["S01"], "moving": images[n], "subject": n}
        for n in a.test
        for _ in range(a.pairs)
    ]
    test = PerturbedPairs(base, pert, seed=2000 + a.seed)
    rows: dict[str, dict[str, list]] = {}

    def record(
        name: str, world: SpatialTransform, det, seconds: float, moved: AffineTransform, lab
    ):
        warped = resample(lab, fixed_lab.grid, TransformChain([world, moved]), mode="nearest")
        r = rows.setdefault(name, {"dice": [], "seconds": [], "folding": []})
        r["dice"].append(an.dice_56(fixed_np, warped.data[0].numpy().astype(np.int64), labels))
        r["seconds"].append(seconds)
        if det is not None:  # % of voxels with det J <= 0 (the deformable part)
            r["folding"].append(float((det <= 0).double().mean() * 100))

    for i in range(len(test)):
        it, subject = test[i], base[i]["subject"]
        lab = read_labels(an.DATA / f"labels/{subject}.nii.gz")
        true = params_to_matrix(it["target"][None].double(), "affine", grid.shape)
        moved = AffineTransform(torch.linalg.inv(an.world_matrix(true, grid)).float())
        f, m = it["fixed"], it["moving"]
        ident = AffineTransform.identity(3)
        record("no perturbation", ident, None, 0.0, ident, lab)
        record("identity", ident, None, 0.0, moved, lab)
        for preset in ("affine", "default"):
            world, det, s = classical_transform(preset, f, m, grid)
            record(f"classical {preset} ({a.spacing:g} mm)", world, det, s, moved, lab)
        for label, model in models.items():
            for name, (world, det, s) in dlir_transforms(model, f, m, grid, label).items():
                record(name, world, det, s, moved, lab)
        log.info(
            "pair %d/%d (%s): %s",
            i + 1,
            len(test),
            subject,
            {k: round(v["dice"][-1], 3) for k, v in rows.items()},
        )

    summary = {
        k: {
            "dice": float(np.mean(v["dice"])),
            "dice_ci95": list(bootstrap_ci(v["dice"])[1:]),
            "dice_sd": float(np.std(v["dice"])),
            "dice_per_pair": [round(x, 4) for x in v["dice"]],
            "seconds": float(np.mean(v["seconds"])),
            "folding_percent": float(np.mean(v["folding"])) if v["folding"] else None,
        }
        for k, v in rows.items()
    }
    result = {
        "benchmark": "dlir_lpba40",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "grid": grid.to_dict(),
        "training": training,
        "results": summary,
        "torch_threads": torch.get_num_threads(),
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(a.output) as tmp:
        tmp.write_text(json.dumps(result, indent=2))

    print(f"\nLPBA40, fixed S01, moving {a.test[0]}–{a.test[-1]} × {a.pairs} random affine")
    print(f"perturbations, {a.spacing:g} mm network grid {grid.shape}, Dice at 1 mm")
    for k, v in training.items():
        print(f"training DLIR {k}: {v['steps']} steps × {a.batch} pairs, {v['seconds']:.0f} s")
    print(
        "\n| method (no labels in training) | Dice (56 labels) [95 % CI] | % det J ≤ 0 | s / pair |"
    )
    print("|---|---|---|---|")
    for k, v in summary.items():
        fold = "–" if v["folding_percent"] is None else f"{v['folding_percent']:.3f}"
        lo, hi = v["dice_ci95"]
        print(f"| {k} | {v['dice']:.3f} [{lo:.3f}, {hi:.3f}] | {fold} | {v['seconds']:.2f} |")
    print(f"\nwrote {a.output}")


if __name__ == "__main__":
    main()
