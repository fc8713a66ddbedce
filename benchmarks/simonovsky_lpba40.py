"""Benchmark: Simonovsky et al.'s learned multimodal metric (``simonovsky``) against mutual
information, both inside the same B-spline registration, on LPBA40 T1 → T2-like.

Data (:mod:`learnreg.data.modalities`): fixed = S01's T2-like twin (made from its T1), moving
= a subject's T1; no registry ships an aligned same-subject multimodal brain pair. CPU scale:
the middle axial slice (index 80) of each volume on a 2 mm network grid (80×96). The score
network is trained on aligned same-subject patch pairs (each training subject's T1 with its own
T2-like twin, and S01's; S11–S34; no labels in training), then drives the B-spline registration
(control spacing 8 then 4 voxels, bending energy) of S01 ← S35–S40 (validation subjects,
never trained on; labels used for scoring only). MI: the same registration, same settings,
``metric: mi`` (nothing trained). Identity: no registration. Mean Dice over the structures
present in the slice (labels nearest neighbour), 95 % bootstrap CIs over the 6 pairs
(:func:`learnreg.eval.statistics.bootstrap_ci`), % det J ≤ 0, seconds per pair (one thread).

Writes benchmarks/results/simonovsky_lpba40.json and prints a Markdown table::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/simonovsky_lpba40.py --steps 200

A smoke run: ``--steps 2 --train S11 S12 --output /tmp/simonovsky.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent))

from learnreg.data.datasets import collate_pairs  # noqa: E402
from learnreg.data.modalities import ModalityPairs, second_modality  # noqa: E402
from learnreg.data.random_warps import LPBA_HELDOUT, LPBA_TRAIN  # noqa: E402
from learnreg.eval.statistics import bootstrap_ci  # noqa: E402
from learnreg.methods.registry import create_method  # noqa: E402
from learnreg.metrics import mean_dice  # noqa: E402
from learnreg.spatial.differential import jacobian_determinant  # noqa: E402
from learnreg.spatial.sampling import warp  # noqa: E402
from tests._lpba_slices import axial_slices, on_network_grid  # noqa: E402

OUT = HERE / "results"
DATA = HERE.parent / ".." / "shared" / "data" / "lpba40"
CONFIG = {"ndim": 2, "features": [16, 16, 32, 32], "iterations": [30, 30]}


def datasets(train: list[str], val: list[str]) -> tuple[ModalityPairs, ModalityPairs]:
    images, labels = axial_slices(DATA, ["S01", *train, *val])
    t1, grid, pre = on_network_grid(images)
    t2 = {n: pre.image(second_modality(im), grid) for n, im in images.items()}
    both = {"t1": t1, "t2-like": t2}
    return (
        ModalityPairs(both, labels, "S01", train, "t1", grid, pre),
        ModalityPairs(both, labels, "S01", val, "t1", grid, pre),
    )


def scores(method, val: ModalityPairs | None, item: dict) -> dict:
    b = collate_pairs([item], val.grid)
    t0 = time.perf_counter()
    if method is None:
        u = torch.zeros(1, 2, *b.fixed.shape[2:])
    else:
        u = method.predict(b.fixed, b.moving, b.grid).displacement
    seconds = time.perf_counter() - t0
    fl = b.fixed_labels[0]
    labels = [int(v) for v in torch.unique(fl) if v != 0]
    warped = warp(b.moving_labels.float(), u, mode="nearest")[0].long()
    det = jacobian_determinant(u)
    return {
        "subject": item["names"][1],
        "dice": mean_dice(fl, warped, labels),
        "folding_percent": float((det <= 0).double().mean() * 100),
        "seconds": seconds,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", nargs="+", default=list(LPBA_TRAIN))
    p.add_argument("--output", type=Path, default=OUT / "simonovsky_lpba40.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    train, val = datasets(a.train, list(LPBA_HELDOUT))
    torch.manual_seed(a.seed)
    learned = create_method("simonovsky", **CONFIG)
    opt = torch.optim.Adam(learned.parameters(), lr=a.lr)
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.perf_counter()
    learned.train()
    for _ in range(a.steps):
        idx = torch.randint(len(train), (a.batch,), generator=g)
        b = collate_pairs([train[int(i)] for i in idx], train.grid)
        terms = learned.loss(b, learned(b.fixed, b.moving, b.grid))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    train_seconds = time.perf_counter() - t0
    mi = create_method("simonovsky", **CONFIG, metric="mi")
    methods = {
        "identity": (None, "—"),
        "B-spline + mutual information": (mi, "nothing trained"),
        "B-spline + learned metric (simonovsky)": (
            learned,
            f"{a.steps} steps, {train_seconds:.0f} s, no labels",
        ),
    }
    results, table = [], {}
    for name, (method, how) in methods.items():
        rows = [scores(method, val, val[i]) for i in range(len(val))]
        results.append({"name": name, "training": how, "labels_in_training": False, "pairs": rows})
        table[name] = {
            "training": how,
            "dice": [round(v, 4) for v in bootstrap_ci([r["dice"] for r in rows])],
            "folding_percent": round(float(np.mean([r["folding_percent"] for r in rows])), 3),
            "seconds_per_pair": round(float(np.mean([r["seconds"] for r in rows])), 2),
        }
    report = {"args": {k: str(v) for k, v in vars(a).items()}, "config": CONFIG}
    report.update({"torch": torch.__version__, "summary": table, "results": results})
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(report, indent=1))
    print("| method | training (labels?) | Dice [95 % CI] | % det J ≤ 0 | s / pair |")
    print("|---|---|---|---|---|")
    for name, row in table.items():
        d = row["dice"]
        print(
            f"| {name} | {row['training']} | {d[0]:.3f} [{d[1]:.3f}, {d[2]:.3f}] | "
            f"{row['folding_percent']:.2f} | {row['seconds_per_pair']:.2f} |"
        )


if __name__ == "__main__":
    main()
