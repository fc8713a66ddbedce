"""Benchmark: throughput (pairs per minute) of ``learnreg register-batch`` against a shell
loop of single ``learnreg register`` commands, on the same pairs, in the same run.

Pairs: LPBA40 subject pairs (S11 → S01, S12 → S01, ...; ``--pairs N``) downsampled to
``--spacing`` mm (default 4), registered with ``--method classical --preset PRESET`` (no
training, no labels used). Each round runs both arms from cold (the loop: one process per
pair, each with torch's default threads, as a user's ``for`` loop; the batch: one command
that starts its own LocalCluster with its default layout, workers × threads chosen from the
machine, and stops it), alternating which goes first. Throughput is pairs / wall time of
the whole arm (process starts and cluster start included); the table gives the mean over
rounds with a 95 % percentile bootstrap CI over rounds (few rounds: wide intervals), and the
paired speedup. The batch's transforms are checked against the loop's (max difference in
mm of fixed-grid points mapped, every 4th voxel).

    .venv/bin/python benchmarks/register_batch.py [--pairs 4] [--rounds 3] [--preset default]

Writes benchmarks/results/register_batch.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from learnreg.api.registration import load_result
from learnreg.eval.statistics import bootstrap_ci
from learnreg.io.images import read_image, write_image
from learnreg.runner.cluster import available_cores, local_layout
from learnreg.spatial.sampling import resample

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LEARNREG_DATA", ROOT / ".." / "shared" / "data")) / "lpba40"
CLI = [sys.executable, "-m", "learnreg"]


def make_pairs(folder: Path, n: int, spacing: float) -> list[tuple[str, Path, Path]]:
    """``n`` LPBA40 pairs (moving S11, S12, ... onto fixed S01, S(11+n), ...) at ``spacing``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    fixed_ids = ["S01", f"S{11 + n}"]
    names = sorted({*fixed_ids, *[f"S{11 + i}" for i in range(n)]})
    for s in names:
        img = read_image(DATA / f"images/{s}.nii.gz")
        grid = img.grid.downsampled(spacing / float(min(img.grid.spacing)))
        write_image(resample(img, grid), folder / f"images/{s}.nii.gz")
    pairs = []
    for i in range(n):
        f, m = fixed_ids[i % 2], f"S{11 + i}"
        pairs.append((f"{m}_to_{f}", folder / f"images/{f}.nii.gz", folder / f"images/{m}.nii.gz"))
    return pairs


def shell_loop(pairs, out: Path, preset: str) -> float:
    t0 = time.perf_counter()
    for name, f, m in pairs:
        cmd = [*CLI, "register", str(f), str(m), "-o", str(out / name), "-q"]
        subprocess.run([*cmd, "--method", "classical", "--preset", preset], check=True)
    return time.perf_counter() - t0


def batch(pairs, out: Path, preset: str, csv: Path) -> float:
    lines = ["fixed,moving,id", *[f"{f},{m},{name}" for name, f, m in pairs]]
    csv.write_text("\n".join(lines) + "\n")
    cmd = [*CLI, "register-batch", str(csv), "-o", str(out), "-q"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--method", "classical", "--preset", preset], check=True)
    return time.perf_counter() - t0


def max_difference(a: Path, b: Path) -> float:
    ra, rb = load_result(a), load_result(b)
    grid = ra.result.fixed_grid
    axes = [torch.arange(0, s, 4) for s in grid.shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, grid.ndim)
    pts = grid.index_to_world(idx.double()).numpy()
    return float(np.abs(ra.map_points(pts) - rb.map_points(pts)).max())


def _ci(v: tuple[float, float, float]) -> dict:
    return dict(zip(("mean", "low", "high"), v, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--spacing", type=float, default=4.0)
    p.add_argument("--preset", default="default")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/register_batch.json")
    a = p.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="learnreg-bench-batch-") as tmp:
        tmp = Path(tmp)
        pairs = make_pairs(tmp / "data", a.pairs, a.spacing)
        for r in range(a.rounds):
            arms = ["loop", "batch"] if r % 2 == 0 else ["batch", "loop"]
            secs = {}
            for arm in arms:
                out = tmp / f"{arm}{r}"
                if arm == "loop":
                    secs[arm] = shell_loop(pairs, out, a.preset)
                else:
                    secs[arm] = batch(pairs, out, a.preset, tmp / "pairs.csv")
                print(f"round {r}: {arm} {secs[arm]:.1f} s", file=sys.stderr)
            diff = max(
                max_difference(tmp / f"loop{r}" / n, tmp / f"batch{r}" / n) for n, *_ in pairs
            )
            rounds.append({"loop_s": secs["loop"], "batch_s": secs["batch"], "max_diff_mm": diff})
    n = a.pairs
    rate = {arm: [60 * n / x[f"{arm}_s"] for x in rounds] for arm in ("loop", "batch")}
    speedup = [x["loop_s"] / x["batch_s"] for x in rounds]
    stats = {arm: bootstrap_ci(v) for arm, v in rate.items()}
    stats["speedup"] = bootstrap_ci(speedup)
    workers, threads = local_layout(n)
    result = {
        "pairs": n,
        "spacing_mm": a.spacing,
        "preset": a.preset,
        "cores": available_cores(),
        "batch_layout": {"workers": workers, "threads": threads},
        "labels_used": False,
        "rounds": rounds,
        "pairs_per_minute": {k: _ci(stats[k]) for k in ("loop", "batch")},
        "speedup": _ci(stats["speedup"]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))

    def cell(v):
        return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"

    print(
        f"\n{n} LPBA40 pairs at {a.spacing:g} mm, classical `{a.preset}` (no training, labels "
        f"not used), {a.rounds} rounds on {available_cores()} cores; mean [95% bootstrap CI "
        "over rounds]\n"
    )
    print("| arm | pairs / min | wall s per round |")
    print("|---|---|---|")
    print(f"| shell loop of `learnreg register` | {cell(stats['loop'])} | "
          f"{np.mean([x['loop_s'] for x in rounds]):.1f} |")  # fmt: skip
    print(f"| `learnreg register-batch` ({workers} workers × {threads} threads) | "
          f"{cell(stats['batch'])} | {np.mean([x['batch_s'] for x in rounds]):.1f} |")  # fmt: skip
    print(f"\nspeedup (loop time / batch time, paired by round): {cell(stats['speedup'])}; "
          f"max transform difference batch vs loop: "
          f"{max(x['max_diff_mm'] for x in rounds):.2e} mm")  # fmt: skip


if __name__ == "__main__":
    main()
