"""Benchmark: miao-pehl through the command line — `learnreg train` then `learnreg register`.

``learnreg train`` trains :class:`learnreg.methods.miao.MiaoPEHL` on the ``drr`` source
(:mod:`learnreg.data.drr_pairs`: DRRs of LPBA40 S11–S20 on the 8 mm network grid at random
poses uniform in ±10, ±10, ±20 mm and ±6° per axis; batch 6, one hierarchy pass per step, no
labels). Test X-rays: ``--pairs`` DRRs of the validation subjects S35–S40 (never trained on)
at random poses of the same ranges, rendered by the trained model's projector and written as
2D NIfTI files; each is registered to the subject's 1 mm volume by

- ``pehl-cli``: ``learnreg register XRAY VOLUME -o OUT --model CHECKPOINT`` (a new process per
  pair; the pose read back from ``OUT/affine.mat`` with SimpleITK);
- ``intensity``: the classical peer of ``benchmarks/miao_2d3d.py`` in the same run — Adam on the
  six pose parameters maximizing NCC(X-ray, DRR) through the same differentiable projector,
  from the identity (``--iters`` steps); no training;
- ``identity``: the start pose.

Reported: mTRE over a 5×5×5 lattice of the network grid (mm), rotation error (°), success
rate (mTRE < 2 mm), seconds per registration (``pehl-cli``: the whole process, start-up and
reading the 1 mm volume included), with 95 % percentile-bootstrap CIs
(:func:`learnreg.eval.statistics.bootstrap_ci`). No labels are used anywhere.

    OMP_NUM_THREADS=1 python benchmarks/miao_cli.py --steps 400 --pairs 24 --iters 200

Writes benchmarks/results/miao_cli.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import yaml

from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.io.images import read_image, write_image
from learnreg.methods.miao import pose_errors, random_poses
from learnreg.zoo.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from miao_2d3d import intensity, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lpba40" / "images"
RANGES = (10.0, 10.0, 20.0, 6.0, 6.0, 6.0)
TRAIN = [f"S{i}" for i in range(11, 21)]
VAL = [f"S{i}" for i in range(35, 41)]
GEOMETRY = {"samples": 40, "depth": 330.0}
LEARNREG = [sys.executable, "-m", "learnreg"]


def config(steps: int, seed: int) -> dict:
    return {
        "method": "miao-pehl",
        "method_config": {**GEOMETRY, "train_iterations": 1},
        "data": {
            "spacing": [8, 8, 8],
            "synthetic": {
                "kind": "drr",
                "images": str(DATA),
                "train": TRAIN,
                "val": ["S35"],
                **GEOMETRY,
                "ranges": list(RANGES),
                "length": 6 * steps,
                "val_length": 8,
                "seed": seed,
            },
        },
        "optimizer": {"lr": 2e-3},
        "steps": steps,
        "batch_size": 6,
        "val_every": steps,
        "checkpoint_every": steps,
        "seed": seed,
        "device": "cpu",
        "progress": False,
    }


def sitk_ras(path: Path) -> np.ndarray:
    """The homogeneous RAS matrix of the ITK (LPS) affine file ``path``."""
    tx = sitk.AffineTransform(sitk.ReadTransform(str(path)))
    flip = np.diag([-1.0, -1.0, 1.0])
    a = np.asarray(tx.GetMatrix()).reshape(3, 3)
    c, t = np.asarray(tx.GetCenter()), np.asarray(tx.GetTranslation())
    m = np.eye(4)
    m[:3, :3] = flip @ a @ flip
    m[:3, 3] = flip @ (t + c - a @ c)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    work = Path(tempfile.mkdtemp(prefix="miao_cli_"))
    (work / "train.yaml").write_text(yaml.safe_dump(config(args.steps, args.seed)))
    t0 = time.perf_counter()
    subprocess.run(
        [*LEARNREG, "train", work / "train.yaml", "-o", work / "run"], env=env, check=True
    )
    train_s = time.perf_counter() - t0
    ckpt = work / "run" / "checkpoints" / "last.pt"
    model = load_model(ckpt)
    m = model.method
    gen = torch.Generator().manual_seed(1000 + args.seed)
    poses = random_poses(args.pairs, RANGES, gen)
    per: dict[str, dict[str, list[float]]] = {
        k: {"mtre": [], "rotation": [], "seconds": []}
        for k in ("identity", "pehl-cli", "intensity")
    }
    volumes: dict[str, tuple[Image, Grid, torch.Tensor]] = {}
    for i in range(args.pairs):
        name = VAL[i % len(VAL)]
        if name not in volumes:
            vol = read_image(DATA / f"{name}.nii.gz")
            grid = model.grid_for(vol)
            volumes[name] = (vol, grid, model.preprocessor.image(vol, grid).batch())
        vol, grid, v = volumes[name]
        with torch.no_grad():
            xray = m.render(v, grid, poses[i : i + 1])
        det = Grid(m.geometry.detector, m.geometry.pixel_spacing)
        xray_path = write_image(Image(xray[0], det, "xray"), work / f"xray_{i}.nii.gz")
        pts = grid.index_to_world(grid.index_lattice(5, torch.float64))
        true = m.pose(poses[i : i + 1].double(), grid)
        for method in per:
            t = time.perf_counter()
            if method == "identity":
                pose = torch.eye(4, dtype=torch.float64)[None]
            elif method == "pehl-cli":
                out = work / f"out_{i}"
                cmd = [*LEARNREG, "register", xray_path, DATA / f"{name}.nii.gz", "-o", out]
                subprocess.run([*cmd, "--model", ckpt, "-q"], env=env, check=True)
                pose = torch.from_numpy(sitk_ras(out / "affine.mat"))[None]
            else:
                p = intensity(m, xray, v, args.iters, grid)
                pose = m.pose(p.double(), grid)
            per[method]["seconds"].append(time.perf_counter() - t)
            e = pose_errors(pose, true, pts)
            per[method]["mtre"].append(float(e["mtre"][0]))
            per[method]["rotation"].append(float(e["rotation"][0]))
        print(f"pair {i}: " + ", ".join(f"{k} {r['mtre'][-1]:.2f}" for k, r in per.items()))
    results = {
        "config": {**vars(args), "ranges": RANGES, "train": TRAIN, "validation": VAL, **GEOMETRY},
        "network_grid_spacing_mm": 8,
        "train_seconds": train_s,
        "labels_used_in_training": False,
    }
    title = (
        f"{args.pairs} X-rays of S35–S40 (validation subjects), {args.steps} training steps "
        f"({train_s:.0f} s); no labels used in training or registration"
    )
    report(per, results, "miao_cli.json", title)


if __name__ == "__main__":
    main()
