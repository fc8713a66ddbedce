"""Benchmark: learnreg's default classical registration vs ANTs SyN on LPBA40.

Fixed S01, moving S35–S40 (../shared/data/lpba40). For each pair and method: mean Dice over
the 56 labels (labels warped with nearest neighbour for both methods), % voxels with
det J ≤ 0 (raw determinant of the deformable part), registration wall time (images already
in memory, file I/O excluded for both) and the process's peak resident memory. Every
(method, pair) runs in a fresh subprocess so peak memory is its own. learnreg's exported
transforms are also replayed with antspyx ``apply_transforms`` to check interoperability.

    python benchmarks/lpba40_register.py [--subjects S35 S36 ...] [--threads 2]

Needs antspyx (``pip install antspyx``; benchmark-only). Writes
benchmarks/results/lpba40_register.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LEARNREG_DATA", ROOT.parent / "shared" / "data")) / "lpba40"
OUT = ROOT / "benchmarks" / "results"


def dice_all(fixed: np.ndarray, warped: np.ndarray) -> float:
    labels = [v for v in np.unique(fixed) if v != 0]
    scores = []
    for v in labels:
        a, b = fixed == v, warped == v
        scores.append(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))
    return float(np.mean(scores))


def worker_learnreg(subject: str) -> dict:
    import ants
    import torch

    from learnreg.io.images import read_image, read_labels
    from learnreg.io.result import save_result
    from learnreg.metrics import jacobian_stats
    from learnreg.optimize.classical import register

    fixed = read_image(DATA / "images/S01.nii.gz")
    moving = read_image(DATA / f"images/{subject}.nii.gz")
    fixed_lab = read_labels(DATA / "labels/S01.nii.gz")
    moving_lab = read_labels(DATA / f"labels/{subject}.nii.gz")
    t0 = time.perf_counter()
    result = register(fixed, moving, "default")
    seconds = time.perf_counter() - t0
    warped_lab = result.warp(moving_lab, mode="nearest").data[0].numpy()
    jac = jacobian_stats(result.deformable.voxel_field())
    row = {
        "dice": dice_all(fixed_lab.data[0].numpy(), warped_lab),
        "folding_percent": 100 * jac["folding_fraction"],
        "sdlogj": jac["sdlogj"],
        "seconds": seconds,
    }
    # interop: replay our files with antspyx and compare with our own warp
    with tempfile.TemporaryDirectory() as tmp:
        save_result(result, tmp)
        ours = result.warp(moving).data[0].numpy()
        f_ants = ants.image_read(str(DATA / "images/S01.nii.gz"))
        m_ants = ants.image_read(str(DATA / f"images/{subject}.nii.gz"))
        replay = ants.apply_transforms(
            f_ants, m_ants, [f"{tmp}/warp.nii.gz", f"{tmp}/affine.mat"], interpolator="linear"
        ).numpy()
        row["ants_replay_mad_percent"] = float(100 * np.abs(replay - ours).mean() / np.ptp(ours))
    del torch
    return row


def worker_ants(subject: str, kind: str) -> dict:
    import ants

    f = ants.image_read(str(DATA / "images/S01.nii.gz"))
    m = ants.image_read(str(DATA / f"images/{subject}.nii.gz"))
    fl = ants.image_read(str(DATA / "labels/S01.nii.gz"))
    ml = ants.image_read(str(DATA / f"labels/{subject}.nii.gz"))
    t0 = time.perf_counter()
    reg = ants.registration(f, m, type_of_transform=kind)
    seconds = time.perf_counter() - t0
    warped = ants.apply_transforms(f, ml, reg["fwdtransforms"], interpolator="nearestNeighbor")
    # ANTs' label-safe interpolation, the counterpart of learnreg's one-hot label warp
    generic = ants.apply_transforms(f, ml, reg["fwdtransforms"], interpolator="genericLabel")
    jac = ants.create_jacobian_determinant_image(f, reg["fwdtransforms"][0]).numpy()
    logj = np.log(np.clip(jac, 1e-9, 1e9))
    return {
        "dice": dice_all(fl.numpy(), warped.numpy()),
        "dice_label": dice_all(fl.numpy(), generic.numpy()),
        "folding_percent": float(100 * (jac <= 0).mean()),
        "sdlogj": float(logj.std()),
        "seconds": seconds,
    }


def run_worker(method: str, subject: str) -> None:
    if method == "learnreg":
        row = worker_learnreg(subject)
    else:
        row = worker_ants(subject, method.removeprefix("ants_"))
    row["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--subjects", nargs="+", default=[f"S{i}" for i in range(35, 41)])
    p.add_argument("--methods", nargs="+", default=["learnreg", "ants_SyN"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "SUBJECT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        run_worker(*a.worker)
        return
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(a.threads)
    rows = []
    for subject in a.subjects:
        for method in a.methods:
            cmd = [sys.executable, __file__, "--worker", method, subject]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode != 0 or not line:
                print(f"{method} {subject} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            row = {"method": method, "subject": subject, **json.loads(line[0][7:])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for method in a.methods:
        r = [x for x in rows if x["method"] == method]
        if r:
            summary[method] = {
                k: float(np.mean([x[k] for x in r]))
                for k in r[0]
                if isinstance(r[0][k], int | float)
            }
    base = summary.get("ants_SyN", {}).get("seconds")
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / "lpba40_register.json"
    from learnreg.core.files import atomic_write

    with atomic_write(out) as tmp:
        tmp.write_text(
            json.dumps({"threads": a.threads, "rows": rows, "summary": summary}, indent=2)
        )
    print(
        "\n| method | mean Dice (56 labels) | % det J ≤ 0 | SDlogJ | time (s) | time / SyN | peak mem (MB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for method, s in summary.items():
        ratio = f"{s['seconds'] / base:.2f}" if base else "–"
        print(
            f"| {method} | {s['dice']:.4f} | {s['folding_percent']:.4f} | {s['sdlogj']:.3f} | "
            f"{s['seconds']:.1f} | {ratio} | {s['peak_memory_mb']:.0f} |"
        )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
