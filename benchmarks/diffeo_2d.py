"""Benchmark: the diffeomorphic and inverse-consistent methods of issue 16 on real 2D pairs —
classical LDDMM (geodesic shooting), ICNet, Krebs' conditional VAE, Sheikhjafari's generative
network optimized per pair (its inverse iterative), the CPAB diffeomorphic transformer
network (inverse ``T^{−θ}``) — beside the classical SVF default and
VoxelMorph-diff, with folding and inverse-consistency errors.

Data: LPBA40 axial slices 70/80/90 on a 64×64 grid over each slice (2.5–3 mm pixels), as
``dense_fields_2d.py``'s pairs. Networks train on S01 ← S11–S34 (72 pairs, no labels in any
loss), each in a fresh process, seed 0, one thread; all are scored on S01 ← S35–S40 (18
pairs; validation subjects, never trained on): mean Dice over the structures in the fixed
slice, % pixels with det J ≤ 0, inverse-consistency error (mean |φ⁻¹∘φ − id| in pixels, with
each method's own inverse: LDDMM's backward flow, ``exp(−v)`` for velocities, ICNet's
inverse U-Net), seconds per pair. 95 % bootstrap CIs over pairs. Writes
benchmarks/results/diffeo_2d.json and prints a Markdown table::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diffeo_2d.py --steps 1500

A smoke run: ``--steps 3 --output /tmp/diffeo_2d.json``. ``--methods dtn-cpab --add-to
benchmarks/results/diffeo_2d.json`` adds one network's row to an earlier report.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from dense_fields_2d import ci, scores, slice_pairs, write_report  # noqa: E402

from learnreg.methods.base import RegistrationBatch  # noqa: E402
from learnreg.methods.registry import create_method  # noqa: E402
from learnreg.optimize.classical import register  # noqa: E402
from learnreg.optimize.generative import register_generative  # noqa: E402
from learnreg.spatial.fields import compose_displacements  # noqa: E402

OUT = HERE / "results"
TRAIN = tuple(f"S{i}" for i in range(11, 35))
METHODS = {
    "icnet": ("icnet", {"ndim": 2}),
    "krebs-cvae": ("krebs-cvae", {"ndim": 2, "shape": [64, 64]}),
    "voxelmorph-diff": ("voxelmorph-diff", {"ndim": 2}),
    "dtn-cpab": ("dtn-cpab", {"shape": [64, 64]}),
}


def ic_error(forward: torch.Tensor, backward: torch.Tensor) -> float:
    return float(compose_displacements(backward, forward).norm(dim=1).mean())


def run_network(name: str, steps: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    method_name, config = METHODS[name]
    m = create_method(method_name, **config)
    train = slice_pairs(TRAIN)
    fixed = torch.stack([p["fixed"].data for p in train])
    moving = torch.stack([p["moving"].data for p in train])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    m.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        i = torch.randint(len(train), (4,), generator=g)
        b = RegistrationBatch(fixed[i], moving[i])
        loss = m.loss(b, m(b.fixed, b.moving))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_seconds = time.perf_counter() - t0
    m.eval()
    rows = []
    for pair in slice_pairs():
        f, mv = pair["fixed"].data[None], pair["moving"].data[None]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = m(f, mv)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            if name == "icnet":
                back = m.inverse_displacement(f, mv)
            else:
                back = out.transform.inverse().voxel_displacement(out.grid)
        u = out.displacement
        rows.append({**scores(u, pair), "ic": ic_error(u, back), "seconds": seconds})
    return {
        "name": name,
        "config": config,
        "steps": steps,
        "train_seconds": train_seconds,
        "labels_in_training": False,
        "pairs": rows,
    }


def run_classical() -> list[dict]:
    out = []
    for preset in ("lddmm", "default"):
        rows = []
        for pair in slice_pairs():
            t0 = time.perf_counter()
            r = register(pair["fixed"], pair["moving"], preset)
            seconds = time.perf_counter() - t0
            a, b = r.native_deformable.voxel_field(), r.native_inverse.voxel_field()
            rows.append(
                {**scores(_on_fixed(r, pair), pair), "ic": ic_error(a, b), "seconds": seconds}
            )
        out.append({"name": f"classical {preset}", "pairs": rows})
    rows = []
    for pair in slice_pairs():
        t0 = time.perf_counter()
        r = register_generative(pair["fixed"], pair["moving"])
        seconds = time.perf_counter() - t0
        a, b = r.deformable.voxel_field(), r.inverse_deformable.voxel_field()
        rows.append({**scores(_on_fixed(r, pair), pair), "ic": ic_error(a, b), "seconds": seconds})
    out.append({"name": "generative (Sheikhjafari), per pair", "pairs": rows})
    return out


def _on_fixed(result, pair) -> torch.Tensor:
    """The registration's fixed → moving map as a voxel displacement of the fixed grid."""
    g = pair["fixed"].grid
    pts = g.world_points().unsqueeze(0)
    moved = pair["moving"].grid.world_to_index(result.transform()(pts)[0])
    return (moved - g.world_to_index(pts[0])).movedim(-1, 0)[None].float()


def summary(results: list[dict]) -> dict:
    table = {}
    for r in results:
        p = r["pairs"]
        table[r["name"]] = {
            "dice": ci([q["dice"] for q in p]),
            "folding_percent": ci([q["folding_percent"] for q in p]),
            "ic_px": ci([q["ic"] for q in p]),
            "seconds_per_pair": round(float(np.mean([q["seconds"] for q in p])), 4),
            "training": {k: r.get(k) for k in ("steps", "train_seconds", "labels_in_training")},
        }
    return table


def print_table(table: dict, unit: str = "px") -> None:
    """The summary as a Markdown table (IC error in ``unit``: pixels or voxels of the grid)."""
    print(
        f"| method | training | Dice [95 % CI] | % det J ≤ 0 | IC error {unit} [95 % CI] | s / pair |"
    )
    print("|---|---|---|---|---|---|")
    for name, row in table.items():
        t = row["training"]
        how = (
            ("—" if name == "identity" else "per pair, no labels")
            if t["steps"] is None
            else (f"no labels, {t['steps']} steps, {t['train_seconds']:.0f} s")
        )
        d, f, e = row["dice"], row["folding_percent"], row["ic_px"]
        print(
            f"| {name} | {how} | {d[0]:.3f} [{d[1]:.3f}, {d[2]:.3f}] | {f[0]:.2f} | "
            f"{e[0]:.3f} [{e[1]:.3f}, {e[2]:.3f}] | {row['seconds_per_pair']:.3f} |"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--output", type=Path, default=OUT / "diffeo_2d.json")
    p.add_argument(
        "--add-to",
        type=Path,
        help="run only --methods and put their rows into this earlier report (its other rows "
        "stay as measured then)",
    )
    p.add_argument("--run", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.run:
        print(json.dumps(run_network(a.run, a.steps, a.lr, a.seed)))
        return
    if a.add_to:
        earlier = json.loads(a.add_to.read_text())["results"]
        results = [r for r in earlier if r["name"] not in a.methods]
    else:
        identity = {"name": "identity", "pairs": []}
        for pair in slice_pairs():
            zero = torch.zeros(1, 2, 64, 64)
            identity["pairs"].append({**scores(zero, pair), "ic": 0.0, "seconds": 0.0})
        results = [identity, *run_classical()]
    for name in a.methods:
        cmd = [
            sys.executable,
            __file__,
            "--run",
            name,
            "--steps",
            str(a.steps),
            "--lr",
            str(a.lr),
            "--seed",
            str(a.seed),
        ]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(done.strip().splitlines()[-1]))
        print(f"{name}: {results[-1]['train_seconds']:.0f} s", flush=True)
    table = summary(results)
    write_report(a.output, a, table, results)
    print_table(table)


if __name__ == "__main__":
    main()
