"""Benchmark: the 2D dense-field networks of issue 15 — FlowNetS, FlowNetC (supervised by the
true field), RegNet (supervised, patch centres), Shan 2018 (unsupervised) — against an
unsupervised VoxelMorph trained for the same wall time on the same data, and the classical
default registration.

Protocol (every network in its own fresh process, fixed seeds, one thread):

* training pairs: real photographs and ANTs' brain slices (the ``both`` source's training
  images), 64×64 crops warped by a random affine (rotation ±10°, translation ±3 px, scale
  ±10 %, shear ±0.05) plus smooth B-spline fields (control spacings 16 and 8 px, up to 2 and
  1 px) — :class:`learnreg.data.random_warps.RandomWarpPairs` ``kind="dense"``; the supervised
  networks see the true field, Shan and VoxelMorph only the images; Adam ``--lr``, batch 8
  (RegNet: 4 pairs × 16 patches);
* end-point error: 64 pairs of the same warps of the *held-out* images (never trained on),
  with the true field, pixels (``identity`` = no motion);
* Dice: real inter-subject pairs, LPBA40 axial slices (indices 70, 80, 90 of 160) of
  S35–S40 (moving) to S01 (fixed), put on a 64×64 grid over the slice (2.5×3 mm), labels by
  nearest neighbour; mean Dice over the structures present in the fixed slice, % of pixels
  with det J ≤ 0, seconds per pair (prediction only). S35–S40 are validation subjects of the
  project (never trained on here; no network here sees any LPBA40 label or image in training);
* classical: ``learnreg``'s ``default`` preset (rigid → affine → SVF, LNCC) on the same 64×64
  pairs; for the synthetic pairs too (its EPE).

95 % bootstrap CIs from :mod:`learnreg.eval.statistics` over pairs. Writes
benchmarks/results/dense_fields_2d.json and prints a Markdown table::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dense_fields_2d.py --steps 2000

A smoke run: ``--steps 5 --output /tmp/dense_fields_2d.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))

from learnreg.core.files import atomic_write  # noqa: E402
from learnreg.core.grid import Grid  # noqa: E402
from learnreg.core.image import Image  # noqa: E402
from learnreg.data.datasets import collate_pairs  # noqa: E402
from learnreg.data.preprocess import NetworkGrid, Preprocessor  # noqa: E402
from learnreg.data.random_warps import warp_source  # noqa: E402
from learnreg.eval.statistics import bootstrap_ci  # noqa: E402
from learnreg.io.images import read_image, read_labels  # noqa: E402
from learnreg.methods.flownet import endpoint_error  # noqa: E402
from learnreg.methods.registry import create_method  # noqa: E402
from learnreg.metrics import mean_dice  # noqa: E402
from learnreg.optimize.classical import register  # noqa: E402
from learnreg.spatial.differential import jacobian_determinant  # noqa: E402
from learnreg.spatial.sampling import resample, warp  # noqa: E402

DATA = ROOT / ".." / "shared" / "data"
SHAPE = (64, 64)
WARPS = {
    "transform": "dense",
    "images": "both",
    "rotation": 10,
    "translation": 3,
    "scale": 0.1,
    "shear": 0.05,
    "field_magnitudes": [2, 1],
}
#: name → (registry method, config, supervised by the true field, uses labels in training)
METHODS = {
    "flownet-s": ("flownet-s", {"ndim": 2, "width": 0.25}, True),
    "flownet-c": ("flownet-c", {"ndim": 2, "width": 0.25}, True),
    "regnet": ("regnet", {"ndim": 2, "width": 0.25}, True),
    "shan-unsupervised": ("shan-unsupervised", {"ndim": 2, "width": 0.25}, False),
    "voxelmorph (same time)": (
        "voxelmorph",
        {"ndim": 2, "integration_steps": 7, "reg_weight": 1.0},
        False,
    ),
}
SLICES = (70, 80, 90)
SUBJECTS = tuple(f"S{i}" for i in range(35, 41))


def synthetic(seed: int):
    options = {**WARPS, "length": 10**7, "val_length": 64, "seed": seed}
    return warp_source(options, Preprocessor(NetworkGrid(SHAPE), percentiles=None))


def slice_pairs(subjects=SUBJECTS) -> list[dict]:
    """S01 ← ``subjects`` (default S35..S40) axial slices on a 64×64 grid: images and
    nearest-neighbour labels."""
    lpba = DATA / "lpba40"

    def load(name: str, k: int) -> tuple[Image, Image]:
        im, lab = (
            read_image(lpba / f"images/{name}.nii.gz"),
            read_labels(lpba / f"labels/{name}.nii.gz"),
        )
        g2 = Grid(im.grid.shape[:2])
        img = Image(im.data[..., k].clone().float(), g2, name)
        lab2 = Image(lab.data[..., k].clone(), g2, name)
        grid = Preprocessor(NetworkGrid(SHAPE), percentiles=None).grid_for(img)
        return resample(img, grid), resample(lab2, grid, mode="nearest")

    pairs = []
    for k in SLICES:
        fixed, fixed_lab = load("S01", k)
        for s in subjects:
            moving, moving_lab = load(s, k)
            pairs.append(
                {
                    "k": k,
                    "subject": s,
                    "fixed": fixed,
                    "moving": moving,
                    "fixed_labels": fixed_lab,
                    "moving_labels": moving_lab,
                }
            )
    return pairs


def scores(displacement: torch.Tensor, pair: dict) -> dict:
    fl = pair["fixed_labels"].data
    labels = [int(v) for v in torch.unique(fl) if v != 0]
    warped = warp(pair["moving_labels"].data[None].float(), displacement, mode="nearest")[0]
    det = jacobian_determinant(displacement)
    return {
        "dice": mean_dice(fl, warped.long(), labels),
        "folding_percent": float((det <= 0).double().mean() * 100),
    }


def train_loop(method, loader, steps: int, seconds: float | None, lr: float) -> dict:
    """Adam on ``loader``'s batches for ``steps`` (or until ``seconds`` of wall time)."""
    opt = torch.optim.Adam(method.parameters(), lr=lr)
    method.train()
    t0, step = time.perf_counter(), 0
    for b in loader:
        if (seconds is None and step >= steps) or (
            seconds is not None and time.perf_counter() - t0 >= seconds
        ):
            break
        terms = method.loss(b, method(b.fixed, b.moving, b.grid))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        step += 1
    method.eval()
    return {"steps": step, "train_seconds": time.perf_counter() - t0}


def train(method, name: str, steps: int, seconds: float | None, lr: float, seed: int) -> dict:
    """:func:`train_loop` on the synthetic pairs (RegNet: 4 pairs × 16 patches, else 8)."""
    train_set, _ = synthetic(seed)
    batch = 4 if name == "regnet" else 8
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch, collate_fn=collate_pairs)
    return train_loop(method, loader, steps, seconds, lr)


def run_network(name: str, steps: int, seconds: float | None, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    method_name, config, supervised = METHODS[name]
    m = create_method(method_name, **config)
    info = train(m, name, steps, seconds, lr, seed)
    m.eval()
    _, val = synthetic(seed)
    vb = collate_pairs([val[i] for i in range(len(val))])
    with torch.no_grad():
        out = m(vb.fixed, vb.moving, vb.grid)
    epe = endpoint_error(out.displacement, vb.target).tolist()
    rows = []
    for pair in slice_pairs():
        f, mv = pair["fixed"].data[None], pair["moving"].data[None]
        t0 = time.perf_counter()
        with torch.no_grad():
            u = m(f, mv).displacement
        rows.append({**scores(u, pair), "seconds": time.perf_counter() - t0})
    return {
        "name": name,
        "method": method_name,
        "config": config,
        "supervised": supervised,
        "labels_in_training": False,
        **info,
        "epe": epe,
        "pairs": rows,
    }


def classical_displacement(fixed: Image, moving: Image) -> tuple[torch.Tensor, float]:
    """The classical ``default`` registration of the pair as a displacement ``(1, D, *S)`` in
    voxels of the fixed grid (index → moving index, as the networks' fields), and its seconds."""
    t0 = time.perf_counter()
    r = register(fixed, moving, "default")
    seconds = time.perf_counter() - t0
    g = fixed.grid
    pts = g.world_points().unsqueeze(0)
    moved = moving.grid.world_to_index(r.transform()(pts)[0])
    return (moved - g.world_to_index(pts[0])).movedim(-1, 0)[None].float(), seconds


def run_baselines(seed: int) -> list[dict]:
    _, val = synthetic(seed)
    vb = collate_pairs([val[i] for i in range(len(val))])
    identity = {
        "name": "identity",
        "epe": endpoint_error(torch.zeros_like(vb.target), vb.target).tolist(),
    }
    classical = {"name": "classical default", "epe": [], "pairs": []}
    grid = Grid(SHAPE)
    for i in range(len(val)):
        u, _ = classical_displacement(Image(vb.fixed[i], grid, "f"), Image(vb.moving[i], grid, "m"))
        classical["epe"].append(float(endpoint_error(u, vb.target[i : i + 1])))
    identity["pairs"] = []
    for pair in slice_pairs():
        zero = torch.zeros(1, 2, *SHAPE)
        identity["pairs"].append({**scores(zero, pair), "seconds": 0.0})
        u, seconds = classical_displacement(pair["fixed"], pair["moving"])
        classical["pairs"].append({**scores(u, pair), "seconds": seconds})
    return [identity, classical]


def run_networks(script: str, methods, args: list[str], results: list[dict]) -> None:
    """Each of ``methods`` trained and scored by ``script --run <name> *args`` in a fresh
    process (its JSON result appended to ``results``); VoxelMorph gets the mean wall time of
    the supervised (or ``time_reference``) runs before it (``--seconds``)."""
    budget = None
    for name in methods:
        cmd = [sys.executable, script, "--run", name, *args]
        if name.startswith("voxelmorph") and budget is not None:
            cmd += ["--seconds", str(budget)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        done = [
            r["train_seconds"] for r in results if r.get("supervised") or r.get("time_reference")
        ]
        budget = float(np.mean(done)) if done else None
        last = results[-1]
        print(f"{name}: {last['steps']} steps, {last['train_seconds']:.0f} s", flush=True)


def summary(results: list[dict], epe: str | None) -> dict:
    """Per method: estimate and 95 % bootstrap CI of the EPE (unless ``epe`` is None), Dice
    and folding, s / pair."""
    return {
        r["name"]: {
            **({epe: ci(r["epe"])} if epe else {}),
            "dice": ci([q["dice"] for q in r["pairs"]]),
            "folding_percent": ci([q["folding_percent"] for q in r["pairs"]]),
            "seconds_per_pair": round(float(np.mean([q["seconds"] for q in r["pairs"]])), 4),
            "train": {
                k: r.get(k) for k in ("steps", "train_seconds", "supervised", "labels_in_training")
            },
        }
        for r in results
    }


def write_report(path: Path, args, table: dict, results: list[dict], **extra) -> None:
    """The benchmark's JSON (its arguments, torch version, summary table, every result and
    ``extra``), written atomically."""
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        **extra,
        "summary": table,
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1))


def ci(values) -> list[float]:
    return [round(v, 4) for v in bootstrap_ci(values)]


def print_table(table: dict, epe: str | None) -> None:
    """The summary as a Markdown table (estimate [95 % CI] over pairs; no EPE column when
    ``epe`` is None)."""
    head = f" {epe} [95 % CI] |" if epe else ""
    print(f"| method | training |{head} Dice [95 % CI] | % det J ≤ 0 | s / pair |")
    print("|---|---|" + "---|" * (4 if epe else 3))
    for name, row in table.items():
        t = row["train"]
        how = (
            "—"
            if t.get("steps") is None
            else (
                f"{'supervised' if t['supervised'] else 'unsupervised'}, "
                f"{'labels' if t.get('labels_in_training') else 'no labels'}, {t['steps']} steps, "
                f"{t['train_seconds']:.0f} s"
            )
        )
        e = next((v for k, v in row.items() if k.startswith("epe")), None) if epe else None
        err = f" {e[0]:.2f} [{e[1]:.2f}, {e[2]:.2f}] |" if e else ""
        d, f = row["dice"], row["folding_percent"]
        print(
            f"| {name} | {how} |{err} {d[0]:.3f} [{d[1]:.3f}, {d[2]:.3f}] | {f[0]:.2f} | "
            f"{row['seconds_per_pair']:.3f} |"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--output", type=Path, default=OUT / "dense_fields_2d.json")
    p.add_argument("--run", help=argparse.SUPPRESS)  # one network, in this (fresh) process
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.run:
        result = run_network(a.run, a.steps, a.seconds, a.lr, a.seed)
        print(json.dumps(result))
        return
    results = run_baselines(a.seed)
    args = ["--steps", str(a.steps), "--lr", str(a.lr), "--seed", str(a.seed)]
    run_networks(__file__, a.methods, args, results)
    table = summary(results, "epe_px")
    write_report(a.output, a, table, results, protocol=__doc__.split("\n\n")[1:4])
    print_table(table, "EPE px")


if __name__ == "__main__":
    main()
