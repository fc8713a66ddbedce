"""Benchmark: homography regression networks vs OpenCV ORB + RANSAC on held-out real photos.

DeTone et al. (2016) report a mean corner error of 9.2 px for HomographyNet against 11.7 px
for ORB + RANSAC on MS-COCO (256-pixel test patches, ρ = 64). Here, with DeTone's protocol
(:mod:`learnreg.data.synthetic`) on scikit-image photographs and ANTs' brain slices:

- training pairs: the training photos and brain slices resized to 320×240, random 128-pixel
  patches, corners perturbed by up to ρ = 32 px; the networks see both patches area-averaged
  4× (32×32 inputs: the CPU-scale networks of :mod:`learnreg.methods.homography`, channels
  16/32, FC 128). A pool of ``--pool`` distinct pairs is generated once and cycled (the same
  pairs, in the same order, for every network);
- test pairs: ``--pairs`` pairs from the held-out photos (camera, coffee, coins,
  motorcycle), the same protocol with another seed — never used for any choice made here;
  ORB + RANSAC gets the full-resolution 128×128 patches, the networks the same pairs 4×
  downsampled (their homography is mapped back exactly), as DeTone ran their networks on
  downsampled test patches. Errors are in pixels of the 128-pixel patch;
- also reported: the held-out brain slice (``r85slice``), ``--brain-pairs`` pairs;
- each network trains through ``learnreg.train`` (the ``homography`` source of
  :mod:`learnreg.data.synthetic`, ``build_datasets`` and the ``Trainer``, as ``learnreg train``
  runs them) for ``--steps`` Adam steps (batch ``--batch``, learning rate ``--lr`` divided by
  10 for the last quarter; DeTone: SGD, 90 000 steps of 64); dropout is off (DeTone: 0.5)
  since the runs are short. The hierarchy (Nowruzi et al.) trains its two modules one after
  the other, as the paper does, by configuration: module 1 (``trainable_levels: [0]``) for
  ``--steps`` steps, then module 2 (``trainable_levels: [1]``, ``init:`` stage 1's checkpoint,
  module 1 frozen) for ``--steps // 2``;
- ORB + RANSAC: ``cv2.ORB_create`` (OpenCV defaults: 500 features, 31-pixel patches and
  borders) and a second, pre-chosen configuration for small images (15-pixel patches and
  borders), brute-force Hamming matching with cross-check, ``cv2.findHomography`` with
  RANSAC (3 px). When it fails (fewer than 4 matches or no homography) the identity's error
  counts, and the failure rate is reported.

    nice -n 10 python benchmarks/homography.py --steps 4000 --pool 32000 --threads 1

Needs scikit-image and opencv-python-headless (benchmark-only). Writes
benchmarks/results/homography.json (training runs under benchmarks/results/runs/homography/)
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from global_networks import fit, train_config  # noqa: E402

from learnreg.core.files import atomic_write  # noqa: E402
from learnreg.data.datasets import collate_pairs  # noqa: E402
from learnreg.data.synthetic import HomographyPairs, brain_slice_images, photo_images  # noqa: E402
from learnreg.methods.homography import (  # noqa: E402
    HierarchicalHomographyNet,
    corner_error,
    patch_corners,
)
from learnreg.methods.registry import create_method  # noqa: E402
from learnreg.spatial.homography import Homography  # noqa: E402
from learnreg.train.trainer import build_datasets  # noqa: E402

PATCH, RHO, DOWN = 128, 32.0, 4
NET = {
    "patch_size": PATCH // DOWN,
    "features": [16, 16, 16, 16, 32, 32, 32, 32],
    "hidden": [128],
    "dropout": 0.0,
}
METHODS = {  # label → (method, its config beyond NET)
    "homography-net": ("homography-net", {}),
    "homography-net-classification": ("homography-net", {"head": "classification"}),
    "homography-unsupervised": ("homography-unsupervised", {}),
    "homography-hierarchical": ("homography-hierarchical", {"levels": 2}),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- data
def pool_source(args) -> dict:
    """``data.synthetic`` of the training pool: ``--pool`` distinct pairs of the training photos
    and brain slices (cycled when steps × batch exceed it), no validation set."""
    return {
        "kind": "homography",
        "images": "both",
        "patch_size": PATCH,
        "rho": RHO,
        "downsample": DOWN,
        "length": args.pool,
        "seed": 0,
        "val_images": False,
    }


def test_sets(args) -> dict:
    tests = {}
    for name, images, n in (
        ("photos", photo_images("heldout"), args.pairs),
        ("brain", brain_slice_images("heldout"), args.brain_pairs),
    ):
        if n < 1:
            continue
        full = HomographyPairs(images, length=n, patch_size=PATCH, rho=RHO, seed=2024)
        low = HomographyPairs(
            images, length=n, patch_size=PATCH, rho=RHO, downsample=DOWN, seed=2024
        )
        items_full = [full[i] for i in range(n)]
        tests[name] = {
            "full": collate_pairs(items_full),
            "low": collate_pairs([low[i] for i in range(n)]),
            "names": [it["names"][0] for it in items_full],
        }
    return tests


# ---------------------------------------------------------------------------- training
def train_stage(
    name: str, method_config: dict, steps: int, args, label: str, init=None, source=None
):
    """One ``learnreg train`` run of ``steps`` on ``source`` (default :func:`pool_source`);
    returns the trained method, timings and its last checkpoint."""
    config = train_config(
        name,
        {**NET, **method_config},
        pool_source(args) if source is None else source,
        optimizer={"lr": args.lr},
        steps=steps,
        batch_size=args.batch,
        checkpoint_every=steps,
        log_every=args.log_every,
        seed=args.seed,
        init=None if init is None else str(init),
        output=str(Path(args.runs) / label),
    )
    torch.manual_seed(args.seed)
    method = create_method(name, **config.method_config)
    train_set, _ = build_datasets(config, method)
    c0 = time.process_time()
    wall = fit(config, method, train_set)
    info = {"steps": steps, "wall_s": round(wall, 1), "cpu_s": round(time.process_time() - c0, 1)}
    log(f"  {label}: {steps} steps in {wall:.0f} s")
    return method, info, Path(config.output) / "checkpoints" / "last.pt"


# ---------------------------------------------------------------------------- evaluation
def to_full(matrix_low: torch.Tensor) -> torch.Tensor:
    """Homographies of the 4× coarse grid mapped onto the full-resolution patch grid: coarse
    voxel ``x`` covers full voxels ``f x + (f − 1)/2``."""
    f = float(DOWN)
    s = torch.tensor(
        [[f, 0.0, (f - 1) / 2], [0.0, f, (f - 1) / 2], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
    h = s @ matrix_low.double() @ torch.linalg.inv(s)
    return h / h[:, 2:, 2:]


def corners_of(matrix: torch.Tensor) -> torch.Tensor:
    c = patch_corners(PATCH, torch.float64)[None].expand(matrix.shape[0], 4, 2)
    return Homography.from_matrix(matrix.double())(c) - c


def summarize(errors: np.ndarray, failures: np.ndarray | None = None) -> dict:
    out = {
        "mean": round(float(errors.mean()), 3),
        "median": round(float(np.median(errors)), 3),
        "p90": round(float(np.percentile(errors, 90)), 3),
        "n": int(errors.size),
    }
    if failures is not None:
        out["failure_rate"] = round(float(failures.mean()), 4)
    return out


@torch.no_grad()
def evaluate_network(method, test: dict) -> tuple[dict, float]:
    low, full = test["low"], test["full"]
    method.eval()
    t0 = time.perf_counter()
    mats = [
        method.predict(low.fixed[i : i + 64], low.moving[i : i + 64]).extras["homography"]
        for i in range(0, low.fixed.shape[0], 64)
    ]
    seconds = time.perf_counter() - t0
    pred = corners_of(to_full(torch.cat(mats)))
    err = corner_error(pred, full.target.double()).numpy()
    return summarize(err), 1000 * seconds / low.fixed.shape[0]


def orb_ransac(test: dict, patch_size: int, edge: int) -> tuple[dict, float]:
    import cv2

    cv2.setNumThreads(1)
    full = test["full"]
    orb = cv2.ORB_create(nfeatures=500, patchSize=patch_size, edgeThreshold=edge)
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
    swap = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # (x, y) ↔ (i, j)
    preds, fails = [], []
    t0 = time.perf_counter()
    for k in range(full.fixed.shape[0]):
        f = (full.fixed[k, 0].numpy() * 255).round().clip(0, 255).astype(np.uint8)
        m = (full.moving[k, 0].numpy() * 255).round().clip(0, 255).astype(np.uint8)
        kf, df = orb.detectAndCompute(f, None)
        km, dm = orb.detectAndCompute(m, None)
        h = None
        if df is not None and dm is not None and len(kf) >= 4 and len(km) >= 4:
            matches = matcher.match(df, dm)
            if len(matches) >= 4:
                src = np.float32([kf[x.queryIdx].pt for x in matches])  # fixed (x, y)
                dst = np.float32([km[x.trainIdx].pt for x in matches])  # moving (x, y)
                h, _ = cv2.findHomography(src, dst, cv2.RANSAC, 3.0)
        if h is None or not np.all(np.isfinite(h)) or abs(h[2, 2]) < 1e-12:
            preds.append(np.eye(3))
            fails.append(True)
        else:
            preds.append(swap @ h @ swap)  # fixed → moving in index (i, j) order
            fails.append(False)
    seconds = time.perf_counter() - t0
    pred = corners_of(torch.from_numpy(np.stack(preds)))
    err = corner_error(pred, full.target.double()).numpy()
    return summarize(err, np.array(fails)), 1000 * seconds / full.fixed.shape[0]


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pool", type=int, default=6400, help="distinct training pairs")
    ap.add_argument("--pairs", type=int, default=1000, help="held-out photo pairs")
    ap.add_argument("--brain-pairs", type=int, default=200, help="held-out brain pairs")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=OUT / "homography.json")
    ap.add_argument("--runs", type=Path, default=OUT / "runs" / "homography")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    log("generating pairs …")
    tests = test_sets(args)
    train_images = sorted({**photo_images("train"), **brain_slice_images("train")})
    results: dict = {"identity": {}, "orb_default": {}, "orb_small": {}}
    for name, test in tests.items():
        zero = torch.zeros_like(test["full"].target, dtype=torch.float64)
        results["identity"][name] = summarize(
            corner_error(zero, test["full"].target.double()).numpy()
        )
        for key, (ps, edge) in (("orb_default", (31, 31)), ("orb_small", (15, 15))):
            stats, ms = orb_ransac(test, ps, edge)
            results[key][name] = {**stats, "ms_per_pair": round(ms, 2)}
        log(
            f"{name}: identity {results['identity'][name]['mean']:.2f} px, ORB "
            f"{results['orb_default'][name]['mean']:.2f} / {results['orb_small'][name]['mean']:.2f}"
        )

    training: dict = {}
    for label in args.methods:
        name, extra = METHODS[label]
        log(f"training {name}")
        if name == "homography-hierarchical":  # Nowruzi's schedule, one module after the other
            _, first, ckpt = train_stage(
                name, {**extra, "trainable_levels": [0]}, args.steps, args, f"{name}-module1"
            )
            method, second, _ = train_stage(
                name,
                {**extra, "trainable_levels": [1]},
                args.steps // 2,
                args,
                f"{name}-module2",
                init=ckpt,
            )
            info = {
                "steps": [first["steps"], second["steps"]],
                "wall_s": round(first["wall_s"] + second["wall_s"], 1),
                "cpu_s": round(first["cpu_s"] + second["cpu_s"], 1),
            }
        else:
            method, info, _ = train_stage(name, extra, args.steps, args, label)
        training[label] = info
        results[label] = {}
        for tname, test in tests.items():
            stats, ms = evaluate_network(method, test)
            results[label][tname] = {**stats, "ms_per_pair": round(ms, 2)}
            if name == "homography-hierarchical":  # module 1 alone, for reference
                single = HierarchicalHomographyNet(**NET, levels=1)
                single.stages[0].load_state_dict(method.stages[0].state_dict())
                s1, _ = evaluate_network(single, test)
                results[label][tname]["module_1_mean"] = s1["mean"]
        log(
            f"{label}: {results[label]['photos']['mean']:.2f} px on held-out photos "
            f"({info['wall_s']:.0f} s wall, {info['cpu_s']:.0f} s CPU)"
        )

    total = time.perf_counter() - t_start
    report = {
        "protocol": {
            "images": "320x240 grayscale",
            "patch_px": PATCH,
            "rho_px": RHO,
            "network_input_px": PATCH // DOWN,
            "train_images": train_images,
            "heldout_photos": sorted(set(tests["photos"]["names"])),
            "pairs": {k: int(v["full"].fixed.shape[0]) for k, v in tests.items()},
            "training_pool": args.pool,
            "errors_in": "pixels of the 128-pixel patch (mean corner error)",
        },
        "config": {
            **vars(args),
            "output": str(args.output),
            "runs": str(args.runs),
            "network": NET,
        },
        "training": training,
        "results": results,
        "total_wall_s": round(total, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.output) as tmp:
        tmp.write_text(json.dumps(report, indent=2))

    names = list(tests)
    head = "| method | " + " | ".join(f"{t} mean (median) px" for t in names)
    print(head + " | ORB failures | steps | train wall / CPU s |")
    print("|---" * (len(names) + 4) + "|")
    rows = [
        ("identity (no motion)", "identity"),
        ("ORB + RANSAC (OpenCV defaults)", "orb_default"),
        ("ORB + RANSAC (15-px patches)", "orb_small"),
    ] + [(m, m) for m in args.methods]
    for label, key in rows:
        cells = [f"{results[key][t]['mean']:.2f} ({results[key][t]['median']:.2f})" for t in names]
        fail = (
            " / ".join(f"{100 * results[key][t]['failure_rate']:.1f}%" for t in names)
            if "failure_rate" in results[key][names[0]]
            else ""
        )
        tr = training.get(key)
        steps = "" if tr is None else str(tr["steps"])
        times = "" if tr is None else f"{tr['wall_s']:.0f} / {tr['cpu_s']:.0f}"
        print(f"| {label} | " + " | ".join(cells) + f" | {fail} | {steps} | {times} |")
    print(f"\ntotal wall time {total / 60:.1f} min; results in {args.output}")


if __name__ == "__main__":
    main()
